"""The command line as one layer: flags made from config fields, one naming scheme, deprecated
names accepted with a warning, one exit-code table, docs/CONFIG.md current."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.commands import SECTION_COMMANDS, reference_markdown
from pipeline.cli.options import flags_of
from pipeline.config import SECTIONS, build, file_section, section_template
from pipeline.errors import EXIT_REFUSED

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def field_paths(cls: type, prefix: tuple[str, ...] = ()) -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        default = cls().__getattribute__(f.name)
        if dataclasses.is_dataclass(default):
            out |= field_paths(type(default), (*prefix, f.name))
        else:
            out.add(".".join((*prefix, f.name)))
    return out


def expected_flag(path: str) -> str:
    parts = path.split(".")
    if len(parts) == 2 and parts[1] == "name":
        return "--" + parts[0].replace("_", "-")
    return "--" + "-".join(p.replace("_", "-") for p in parts)


def test_every_flag_is_a_config_field_and_every_field_a_flag():
    for section, commands in SECTION_COMMANDS.items():
        fields = field_paths(SECTIONS[section])
        for name, spec in commands:
            flags = {f.flag: f.field for f in spec.flags}
            assert all(expected_flag(field) == flag for flag, field in flags.items()), name
            assert set(flags.values()) <= fields, name
            assert all(f.help for f in spec.flags), f"{name}: a flag without help text"
            # each command's --help lists exactly those flags, with their defaults
            out = invoke(*name.split()[1:], "--help").output
            for flag in flags:
                assert flag in out, (name, flag)
        # the command that reads the whole section has a flag for every field
        assert {f.field for f in commands[-1][1].flags} == fields, section


def test_config_reference_is_current_and_every_template_loads():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc.strip() == reference_markdown().strip(), "regenerate: replica config --markdown > docs/CONFIG.md"
    for name, cls in SECTIONS.items():
        data = yaml.safe_load("\n".join(section_template(name)))
        assert build(cls, data[name]) == cls()
    r = invoke("config", "search")
    assert r.exit_code == 0 and "verify_top: 12" in r.output


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and re.match(r"replica, version \d+\.\d+\.\d+", r.output)
    for cmd in (["embed"], ["search"], ["index", "build"], ["import-embeddings"], ["report"], ["demo"],
                ["pipeline"], ["sample"], ["index", "search"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, cmd
    assert "[default: (0.5)]" in invoke("search", "--help").output.replace("\n", " ").replace("  ", " ") \
        or "0.5" in invoke("search", "--help").output


def test_last_releases_names_are_accepted_with_a_warning(tmp_path):
    """Old flags and config keys resolve to today's fields, with one warning each."""
    old = tmp_path / "old.yaml"
    old.write_text("input: [a.tar]\noutput: out\nstorage: {region: eu-west-1}\nray: {num_actors: 3, address: auto}\n")
    data, notes = file_section(str(old), "embed")
    assert data == {"input": ["a.tar"], "output": "out", "s3": {"region": "eu-west-1"},
                    "ray": {"address": "auto"}, "num_actors": 3}
    assert len(notes) == 3 and any("no sections" in n for n in notes)
    assert any("embed.storage is deprecated; use embed.s3" in n for n in notes)
    index = tmp_path / "index.yaml"
    index.write_text("index:\n  index: i\n  ray_address: ray://h:10001\n")
    data, notes = file_section(str(index), "index")
    assert data == {"index": "i", "ray": {"address": "ray://h:10001"}} and len(notes) == 1
    # last release's single second stage: today's list and weights section
    rerank = tmp_path / "rerank.yaml"
    rerank.write_text("search:\n  rerank: {name: sscd, checkpoint: s.pt, image_size: 64}\n  rerank_top: 5\n")
    data, notes = file_section(str(rerank), "search")
    assert data == {"rerank": ["sscd"], "sscd": {"checkpoint": "s.pt", "image_size": 64}, "rerank_top": 5}
    assert len(notes) == 1 and "use `rerank: [sscd]` and its weights under `sscd:`" in notes[0]
    assert build(SECTIONS["search"], data).sscd.embedder("sscd").checkpoint == "s.pt"
    rerank.write_text("search:\n  rerank: {name: ''}\n")
    assert file_section(str(rerank), "search") == ({"rerank": []}, [])
    keys = tmp_path / "keys.yaml"
    keys.write_text("search:\n  storage: {key: AKIA, secret: s}\n")
    with pytest.raises(Exception, match="no longer read from config files"):
        file_section(str(keys), "search")

    # old flags: rewritten with a warning, then refused for their values like any flag
    r = invoke("embed", "-i", str(tmp_path / "none" / "*.tar"), "-o", str(tmp_path / "o"), "--model", "X",
               "--address", "auto")
    assert "warning: --model is deprecated; use --embedder-model" in r.output
    assert "warning: --address is deprecated; use --ray-address" in r.output
    assert r.exit_code == EXIT_REFUSED and "error: no input tar" in r.output
    r = invoke("search", "-q", str(tmp_path / "gen"), "--index", str(tmp_path / "noindex"), "-o", str(tmp_path / "r"))
    assert "warning: -q is deprecated; use --queries" in r.output and r.exit_code == EXIT_REFUSED


def test_usage_errors_are_one_line_refusals():
    r = invoke("embed", "--batch-size", "many")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == EXIT_REFUSED and len(lines) == 1 and lines[0].startswith("error: ")
    assert "--batch-size" in lines[0] and "replica embed --help" in lines[0]


def test_flag_names_follow_the_rule_for_nested_sections():
    flags = {f.field: f.flag for f in flags_of(SECTIONS["search"])}
    assert flags["embedder.name"] == "--embedder" and flags["dino.checkpoint"] == "--dino-checkpoint"
    assert flags["rerank"] == "--rerank" and flags["rerank_chunks"] == "--rerank-chunks"
    assert flags["s3.endpoint_url"] == "--s3-endpoint-url" and flags["ray.address"] == "--ray-address"
    assert flags["queries"] == "--queries"
