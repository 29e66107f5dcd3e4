"""Class names and prompt templates for zero-shot classification.

Shipped lists (package data in `assets/`), from OpenAI's CLIP notebook "Prompt Engineering for
ImageNet": the 1,000 ImageNet class names (in the standard class-index order, i.e. the sorted
WordNet-id folders; the list keeps OpenAI's two duplicated names, 'missile' and 'sunglasses', so
numbers stay comparable with published ones), the 80 templates of the CLIP paper ('clip80'), and
the 7 templates found by forward selection over them ('clip_short').
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from flip_ds.config_loader import UsageError

BUILTIN_CLASSNAMES = {"imagenet1k": "imagenet1k_classnames.txt"}
BUILTIN_TEMPLATES = {"clip80": "templates_clip80.txt", "clip_short": "templates_clip_short.txt"}


def _lines(text: str) -> list[str]:
    """Non-empty lines; '#' starts a comment line."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read(spec: str, builtin: dict[str, str], what: str) -> list[str]:
    if spec in builtin:
        return _lines(resources.files("flip_ds.evaluation").joinpath("assets", builtin[spec]).read_text("utf-8"))
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"{what} '{spec}' is neither a file nor one of {', '.join(builtin)}")
    lines = _lines(path.read_text("utf-8"))
    if not lines:
        raise UsageError(f"{what} file '{spec}' has no entries")
    return lines


def load_templates(spec: str) -> list[str]:
    """'clip80', 'clip_short' or a file of templates, one a line, each with one '{}' for the class name."""
    templates = _read(spec, BUILTIN_TEMPLATES, "templates")
    for t in templates:
        if t.count("{}") != 1:
            raise UsageError(f"template {t!r} in '{spec}' must contain exactly one '{{}}' (the class name)")
    return templates


def load_classnames(spec: str, folder_classes: list[str]) -> list[str]:
    """Names for the classes of an image folder, in its (sorted) class order.

    `spec` is '' (use the folder names, underscores as spaces), 'imagenet1k' or a file with one
    name a line, in the order of the sorted class folders.
    """
    if not spec:
        return [c.replace("_", " ") for c in folder_classes]
    names = _read(spec, BUILTIN_CLASSNAMES, "classnames")
    if len(names) != len(folder_classes):
        raise UsageError(f"classnames '{spec}' has {len(names)} names but the image folder has "
                         f"{len(folder_classes)} classes")
    return names
