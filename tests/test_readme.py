"""Keep the documentation true: the README (the front page) and the pages under docs/.

Every config key has a row in docs/configuration.md, every CLI option is mentioned somewhere in the
README or docs/, the README still states the two commands, and every relative link points at a file
that exists and, with an #anchor, at a heading of it (GitHub's slugs).
"""

import dataclasses
import os
import re
from pathlib import Path

import pytest

from selfdistill.cli.evaluate import build_parser as eval_parser
from selfdistill.cli.plan import build_parser as plan_parser
from selfdistill.cli.pretrain import build_parser as pretrain_parser
from selfdistill.cli.shards import build_parser as shards_parser
from selfdistill.methods import method_config_class, method_names
from selfdistill.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
ALL_TEXT = "\n".join(p.read_text() for p in DOCS)

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The markdown outside fenced code blocks (a `#` there is no heading, a `[a](b)` no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than '-' and '_'
    dropped, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Training: `run_pretrain.py` (also `selfdistill-pretrain`)") == \
        "training-run_pretrainpy-also-selfdistill-pretrain"
    assert slug("The loader with `data.augment_on: device` (issue 15), side by side") == \
        "the-loader-with-dataaugment_on-device-issue-15-side-by-side"
    assert slug("How to add …") == "how-to-add-"


def test_every_config_key_is_documented():
    config = load_config(None)
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        assert f"### `{section.name}`" in CONFIGURATION, section.name
        for f in dataclasses.fields(value):
            assert re.search(rf"^\| `{f.name}` \|", CONFIGURATION, re.M), \
                f"{section.name}.{f.name} missing from docs/configuration.md"


def test_every_method_key_is_documented():
    for name in method_names():
        assert re.search(rf"^### `method` \(.*`method\.name: {name}`", CONFIGURATION, re.M), \
            f"no `method` section for {name} in docs/configuration.md"
        for f in dataclasses.fields(method_config_class(name)):
            assert re.search(rf"^\| `{f.name}` \|", CONFIGURATION, re.M), \
                f"method.{f.name} ({name}) missing from docs/configuration.md"


def _options(parser):
    for action in parser._actions:
        if action.option_strings:
            yield from (o for o in action.option_strings if o.startswith("--") and o != "--help")
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sub in action.choices.values():
                yield from _options(sub)


def test_every_cli_option_is_documented():
    for option in [*_options(pretrain_parser()), *_options(eval_parser()), *_options(shards_parser()),
                   *_options(plan_parser())]:
        assert option in ALL_TEXT, f"{option} is in no page (README.md, docs/*.md)"


def test_readme_states_the_two_commands_and_links_every_page():
    text = README.read_text()
    assert "make demo" in text and "make test" in text  # .ci/run runs `make test`, the README's test command
    for page in PAGES:
        assert f"](docs/{page.name})" in text, f"the README does not link docs/{page.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(_prose(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_layout_lists_the_files():
    """docs/architecture.md's Layout block names every module and benchmark, and nothing that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"^## Layout\s*\n+```\n(.*?)^```", text, re.M | re.S)
    assert block, "no ## Layout code block in docs/architecture.md"
    layout = block.group(1)
    named = set(re.findall(r"[\w-]+\.(?:py|sh|txt|json|md)\b", layout))
    files = [p for p in [*(ROOT / "src" / "selfdistill").rglob("*.py"), *(ROOT / "benchmarks").glob("*"), *PAGES]
             if p.is_file() and p.name != "__init__.py"]
    missing = sorted({p.relative_to(ROOT).as_posix() for p in files if p.name not in named})
    assert not missing, f"not in docs/architecture.md's Layout: {missing}"
    existing = set()
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"runs", "__pycache__"}]
        existing.update(names)
    gone = sorted(n for n in named if n not in existing)
    assert not gone, f"docs/architecture.md's Layout names files that do not exist: {gone}"
