"""Wrong settings fail before any work starts: one line saying what to change, exit 2, nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.sample import make_sample_tars


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tars")
    make_sample_tars(str(folder), tars=1, per_tar=3)
    return folder


def run(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def assert_one_line_error(code, output, *phrases):
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for phrase in phrases:
        assert phrase in lines[0], output


@pytest.mark.parametrize(
    "extra, phrases",
    [
        (["--embedder", "resnet"], ["unknown embedder 'resnet'", "default, open_clip, sscd"]),
        (["--embedder", "open_clip", "--model", "NoSuchNet", "--pretrained", "x"], ["unknown open_clip architecture 'NoSuchNet'"]),
        (["--embedder", "open_clip", "--model", "ViT-B-32"], ["needs embedder.pretrained"]),
        (["--embedder", "sscd"], ["needs embedder.checkpoint"]),
        (["--embedder", "sscd", "--checkpoint", "/nowhere/sscd.pt"], ["'/nowhere/sscd.pt' does not exist"]),
        (["--device", "tpu"], ["device must be auto, cpu or cuda"]),
        (["--batch-size", "0"], ["batch_size"]),
    ],
)
def test_bad_embedder_settings(tmp_path, tars, extra, phrases):
    out = tmp_path / "out"
    code, output = run(["embed", "-i", str(tars / "*.tar"), "-o", str(out), *extra])
    assert_one_line_error(code, output, *phrases)
    assert not out.exists()


def test_missing_input(tmp_path):
    code, output = run(["embed", "-i", str(tmp_path / "nothing" / "*.tar"), "-o", str(tmp_path / "out")])
    assert_one_line_error(code, output, "no input tar", "--input")
    assert not (tmp_path / "out").exists()


def test_no_output(tars):
    assert_one_line_error(*run(["embed", "-i", str(tars / "*.tar")]), "--output")


def test_unknown_and_mistyped_config_keys(tmp_path, tars):
    bad = tmp_path / "c.yaml"
    bad.write_text(f"input: [{tars}/00000.tar]\noutput: {tmp_path}/o\nbatchsize: 3\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "unknown setting batchsize")
    bad.write_text("embedder:\n  name: default\n  imagesize: 3\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "unknown setting embedder.imagesize")
    bad.write_text("batch_size: lots\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "batch_size must be a number")
    assert_one_line_error(*run(["embed", "-c", str(tmp_path / "none.yaml")]), "does not exist")


def test_config_file_and_flags_share_field_names(tmp_path, tars):
    from pipeline.config import EmbedConfig, build, load_file, merge

    f = tmp_path / "c.toml"
    f.write_text(f'input = ["{tars}/00000.tar"]\noutput = "{tmp_path}/o"\nbatch_size = 8\n[embedder]\nname = "default"\n[ray]\nnum_actors = 2\n')
    cfg = build(EmbedConfig, merge(load_file(str(f)), {"batch_size": 32, "embedder": {"device": "cpu"}}))
    assert (cfg.batch_size, cfg.embedder.name, cfg.embedder.device, cfg.ray.num_actors) == (32, "default", "cpu", 2)


def test_unwritable_bucket(tmp_path, tars, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    code, output = run(["embed", "-i", str(tars / "*.tar"), "-o", "s3://no-such-bucket/emb",
                        "--s3-endpoint-url", s3_server.endpoint_url, "--s3-region", s3_server.region])
    assert_one_line_error(code, output, "cannot write to output 's3://no-such-bucket/emb'")


def test_config_reference_is_current_and_loads():
    """docs/CONFIG.md is what `replica config --markdown` prints, and every template loads back."""
    import yaml

    from pipeline.config import SECTIONS, build, reference_markdown, template

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    assert doc.strip() == reference_markdown().strip(), "regenerate: replica config --markdown > docs/CONFIG.md"
    for cls in SECTIONS.values():
        assert build(cls, yaml.safe_load("\n".join(template(cls)))) == cls()
    code, output = run(["config", "search"])
    assert code == 0 and "verify_top: 10" in output
