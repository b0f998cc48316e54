"""Pretrained weights by name: a timm pretrained tag or an ``hf-hub:`` repo, found in the local
Hugging Face cache only (nothing is downloaded at run time); the weights door reads the file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from selfdistill.models.weights import WEIGHT_SUFFIXES

__all__ = ["HUB_PREFIX", "hub_cache_dir", "hub_weights_file", "is_hub_name"]

HUB_PREFIX = "hf-hub:"


def is_hub_name(spec: str) -> bool:
    """``spec`` names hub weights: ``hf-hub:org/repo`` or a timm pretrained tag
    (``vit_small_patch16_224.dino``) that is not a local path."""
    if spec.startswith(HUB_PREFIX):
        return True
    if not spec or Path(spec).exists() or "/" in spec or os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        return False
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(spec)
    return bool(tag) and timm.is_model(arch)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it, read when called:
    ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_weights_file(spec: str, what: str = "model.pretrained") -> tuple[Path, str]:
    """The cached weights file of a timm pretrained tag or an ``hf-hub:org/repo[@revision]`` name,
    and the timm architecture it is for ('' where the cache does not say). Nothing is downloaded:
    a file not in the cache is a one-line error with the command that fetches it."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch = ""
    if spec.startswith(HUB_PREFIX):
        repo, filenames = spec[len(HUB_PREFIX):], []
    else:
        arch = split_model_name_tag(spec)[0]
        try:
            cfg = get_pretrained_cfg(spec)
        except RuntimeError:
            cfg = None
        if cfg is None:
            import timm

            tags = timm.list_pretrained(f"{arch}.*")
            raise ValueError(f"{what}: timm has no pretrained weights {spec!r} (its tags of {arch}: "
                             f"{', '.join(tags[:8]) or 'none'}{', ...' if len(tags) > 8 else ''})")
        if not cfg.hf_hub_id:
            raise ValueError(f"{what}: timm reads {spec!r} from {cfg.url or cfg.file}, not the Hugging Face hub; "
                             f"download that file and give its path in {what}")
        repo, filenames = cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    repo, _, revision = repo.partition("@")
    names = [n for f in filenames for n in (re.sub(r"pytorch_model\.bin$", "model.safetensors", f), f)] or [
        "model.safetensors", "pytorch_model.bin"]
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    found = next((p for n in dict.fromkeys(names)
                  if isinstance(p := try_to_load_from_cache(repo, n, cache_dir=cache, revision=revision or None), str)),
                 None)
    if found is None:
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(f"{what}: {spec} ({repo}, {' or '.join(dict.fromkeys(names))}) is not in the Hugging "
                                f"Face cache {cache} and nothing is downloaded at run time; fetch it once with: "
                                f"`hf download {repo}{rev}` (HF_HUB_CACHE or HF_HOME choose the cache)")
    config = try_to_load_from_cache(repo, "config.json", cache_dir=cache, revision=revision or None)
    if isinstance(config, str):
        arch = json.loads(Path(config).read_text()).get("architecture", arch) or arch
    return Path(found), arch
