"""The package layers: models/ and diffusion/ at the bottom import nothing from the packages
above them or from the scripts, so they can be reused (e.g. AMM in another DiT) on their own;
and the scripts start without the slow imports they may not need."""
import ast
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTTOM_PACKAGES = ("models", "diffusion")
ABOVE = {"sampling", "training", "evaluations", "latents", "demo", "digits", "benchmarks", "tests"}


def imported_top_level_names(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_models_and_diffusion_import_nothing_from_above_or_the_scripts():
    scripts = {name[:-3] for name in os.listdir(REPO_ROOT) if name.endswith(".py")}
    assert {"train_mask_adan", "image_generator_ddp", "extract_features"} <= scripts
    offending = []
    for package in BOTTOM_PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    offending += [f"{os.path.relpath(path, REPO_ROOT)}: {module}"
                                  for module in imported_top_level_names(path) if module in ABOVE | scripts]
    assert offending == []


def test_scripts_import_diffusers_only_when_they_use_it():
    """diffusers' import takes seconds on every process (it loads torch._dynamo): the scripts
    import it when they load a VAE or a diffusers solver, not on start."""
    probe = ("import sys, extract_features, image_generator, image_generator_ddp, train_mask_adan; "
             "print(sorted(name for name in ('diffusers', 'scipy.stats') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
