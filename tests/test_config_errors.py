"""Wrong settings fail before any work starts: one line saying what to change, exit 2, nothing written."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

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
        (["--embedder", "resnet"], ["'resnet' is not one of 'default', 'open_clip', 'sscd'"]),
        (["--embedder", "open_clip", "--embedder-model", "NoSuchNet", "--embedder-pretrained", "x"],
         ["unknown open_clip architecture 'NoSuchNet'"]),
        (["--embedder", "open_clip", "--embedder-model", "ViT-B-32"], ["needs embedder.pretrained"]),
        (["--embedder", "sscd"], ["needs embedder.checkpoint"]),
        (["--embedder", "sscd", "--embedder-checkpoint", "/nowhere/sscd.pt"], ["'/nowhere/sscd.pt' does not exist"]),
        (["--embedder-device", "tpu"], ["'tpu' is not one of 'auto', 'cpu', 'cuda'"]),
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
    bad.write_text(f"embed:\n  input: [{tars}/00000.tar]\n  output: {tmp_path}/o\n  batchsize: 3\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "unknown setting embed.batchsize")
    bad.write_text("embed:\n  embedder:\n    name: default\n    imagesize: 3\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "unknown setting embed.embedder.imagesize")
    bad.write_text("embed:\n  batch_size: lots\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "batch_size must be a number")
    bad.write_text("embed:\n  embedder:\n    device: tpu\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "embed.embedder.device must be one of auto, cpu, cuda")
    bad.write_text("embedd:\n  batch_size: 3\n")
    assert_one_line_error(*run(["embed", "-c", str(bad)]), "unknown section 'embedd'")
    assert_one_line_error(*run(["embed", "-c", str(tmp_path / "none.yaml")]), "does not exist")


def test_config_file_and_flags_share_field_names(tmp_path, tars):
    from pipeline.config import EmbedConfig, build, file_section, merge

    f = tmp_path / "c.toml"
    f.write_text(f'[embed]\ninput = ["{tars}/00000.tar"]\noutput = "{tmp_path}/o"\nbatch_size = 8\nnum_actors = 2\n'
                 '[embed.embedder]\nname = "default"\n')
    data, notes = file_section(str(f), "embed")
    cfg = build(EmbedConfig, merge(data, {"batch_size": 32, "embedder": {"device": "cpu"}}))
    assert notes == []
    assert (cfg.batch_size, cfg.embedder.name, cfg.embedder.device, cfg.num_actors) == (32, "default", "cpu", 2)


def test_unwritable_bucket(tmp_path, tars, s3_server):
    code, output = run(["embed", "-i", str(tars / "*.tar"), "-o", "s3://no-such-bucket/emb",
                        "--s3-endpoint-url", s3_server.endpoint_url, "--s3-region", s3_server.region])
    assert_one_line_error(code, output, "cannot write to output 's3://no-such-bucket/emb'")
