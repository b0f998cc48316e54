"""Keep the README true: every config key and CLI option is documented."""

import dataclasses
import re
from pathlib import Path

from selfdistill.cli.evaluate import build_parser as eval_parser
from selfdistill.cli.plan import build_parser as plan_parser
from selfdistill.cli.pretrain import build_parser as pretrain_parser
from selfdistill.cli.shards import build_parser as shards_parser
from selfdistill.recipe import load_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_key_is_documented():
    config = load_config(None)
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        assert f"### `{section.name}`" in README, section.name
        for f in dataclasses.fields(value):
            assert re.search(rf"^\| `{f.name}` \|", README, re.M), f"{section.name}.{f.name} missing from README"


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
        assert option in README, option
