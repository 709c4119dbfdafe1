"""The Gradio page of the web demo: its controls, the generate button and the messages that
bad input shows (gr.Error), over demo.generation."""
import gradio as gr

from sampling.sampler import SAMPLERS

from .generation import DemoInputError, Request, generate, whole_number

DEFAULT_STEPS = 50
MAX_STEPS = 1000
DEFAULT_CFG = 4.0
MAX_CFG = 10.0
SAMPLER_CHOICES = list(SAMPLERS)  # the sampling scripts' --sampler choices


def class_choices(demo_model):
    return [(f"{label}: {name}" if name != str(label) else name, str(label))
            for label, name in enumerate(demo_model.class_names)]


def amm_choices(demo_model):
    return [(str(index), index) for index in range(demo_model.num_blocks)]


def default_cfg(demo_model):
    return 1.0 if demo_model.loaded.unconditional else DEFAULT_CFG


def model_summary(demo_model):
    loaded = demo_model.loaded
    classes = "unconditional" if loaded.unconditional else f"{len(demo_model.class_names)} classes"
    return (f"**{loaded.model_name}** from `{demo_model.ckpt}`: {classes}, "
            f"{loaded.image_size}x{loaded.image_size} px, VAE {loaded.vae_name}, "
            f"{demo_model.num_blocks} blocks, AMM as loaded in {demo_model.amm_blocks}")


def build_page(cache, initial, max_images, batch_size):
    """The gr.Blocks of the demo, showing `initial` (a DemoModel of `cache`) first."""

    def load(ckpt):
        try:
            demo_model = cache.get((ckpt or "").strip())
        except DemoInputError as error:
            raise gr.Error(str(error))
        return (gr.update(choices=class_choices(demo_model), value="0"),
                gr.update(choices=amm_choices(demo_model), value=demo_model.amm_blocks),
                model_summary(demo_model), gr.update(value=default_cfg(demo_model)))

    def run(ckpt, class_label, cfg_scale, sampler, num_steps, seed, num_images, amm_blocks,
            progress=gr.Progress()):
        def report(done, total):
            progress((done, total), desc="sampling", unit="forwards")
        try:
            request = Request((ckpt or "").strip(), class_label, float(cfg_scale), sampler,
                              whole_number(num_steps, "sampling steps"), whole_number(seed, "seed"),
                              whole_number(num_images, "images"), [int(index) for index in amm_blocks])
            progress(0, desc="sampling")
            return generate(cache, request, max_images, batch_size, report)
        except DemoInputError as error:
            raise gr.Error(str(error))

    with gr.Blocks(title="EDT: with and without AMM", analytics_enabled=False) as page:
        gr.Markdown("# EDT: samples with and without the attention modulation matrix (AMM)\n"
                    "Both sets start from the same noise; only the AMM blocks differ.")
        with gr.Row():
            ckpt = gr.Textbox(initial.ckpt, max_lines=1, label="checkpoint (Enter loads it)", elem_id="ckpt",
                              scale=3)
            info = gr.Markdown(model_summary(initial), elem_id="model-info")
        with gr.Row():
            class_label = gr.Dropdown(class_choices(initial), value="0", allow_custom_value=True,
                                      label="class (a name or an index)", elem_id="class")
            cfg_scale = gr.Slider(1.0, MAX_CFG, value=default_cfg(initial), step=0.1, label="guidance scale",
                                  elem_id="cfg")
            sampler = gr.Dropdown(SAMPLER_CHOICES, value=SAMPLER_CHOICES[0], label="sampler", elem_id="sampler")
            num_steps = gr.Number(DEFAULT_STEPS, precision=0, minimum=1, maximum=MAX_STEPS,
                                  label="sampling steps", elem_id="steps")
        with gr.Row():
            seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
            num_images = gr.Number(min(4, max_images), precision=0, label=f"images (at most {max_images})",
                                   elem_id="num-images")
            amm_blocks = gr.CheckboxGroup(amm_choices(initial), value=initial.amm_blocks,
                                          label="AMM blocks (left image)", elem_id="amm-blocks")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        image = gr.Image(label="with AMM (left), without AMM (right)", format="png", interactive=False,
                         buttons=["download", "fullscreen"], elem_id="comparison")
        summary = gr.Markdown(elem_id="summary")

        ckpt.submit(load, ckpt, [class_label, amm_blocks, info, cfg_scale])
        button.click(run, [ckpt, class_label, cfg_scale, sampler, num_steps, seed, num_images, amm_blocks],
                     [image, summary])
    return page
