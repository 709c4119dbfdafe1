"""Class-name files: diffusers' id2label JSON ({"0": "tench, Tinca tinca", ...}) or one line per
class (line k names class k), as for ImageNet's 1000 classes."""
import json


def read_class_names(path):
    """[names of class 0, names of class 1, ...]; ValueError when a JSON file skips an index."""
    with open(path) as f:
        text = f.read()
    try:
        id2label = {int(index): names for index, names in json.loads(text).items()}
    except (json.JSONDecodeError, AttributeError, ValueError):
        return [line.strip() for line in text.splitlines() if line.strip()]
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"{path} does not name the classes 0 to {len(id2label) - 1}")
    return [id2label[index] for index in range(len(id2label))]
