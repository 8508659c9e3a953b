"""The README is the entry point and docs/config.md the config reference: both must match the code."""

import re

from conftest import ROOT

from distgan.config import all_keys, describe

README = (ROOT / "README.md").read_text()
CONFIG_REFERENCE = (ROOT / "docs" / "config.md").read_text()


def test_readme_opens_with_the_train_and_test_commands():
    commands = re.findall(r"^    (python3 -m venv .+)$", README, flags=re.M)
    assert len(commands) >= 2
    assert commands[0].endswith("python -m distgan.train")
    assert commands[1].endswith("python -m pytest -q")
    assert README.index(commands[0]) < README.index("## ")  # before the first section


def test_config_reference_is_current():
    assert describe() in CONFIG_REFERENCE, (
        "regenerate the config reference in docs/config.md from `python -m distgan.train --help`"
    )
    for key in all_keys():
        assert f"--{key}=" in CONFIG_REFERENCE
