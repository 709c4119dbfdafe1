"""The package layers: models/ and diffusion/ at the bottom import nothing from the packages
above them or from the scripts, so they can be reused (e.g. AMM in another DiT) on their own."""
import ast
import os

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
