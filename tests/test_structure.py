"""The code's structure rules, checked on its syntax tree: each on-disk format is named in one place."""
from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
LAYOUT = PIPELINE / "layout"

#: File names and name parts of every on-disk format; only pipeline/layout/ may spell them.
FORMAT_NAMES = [
    "_replica.json", ".stats.json", "run_id=", "run.json", "queries.parquet", "matches.parquet",
    "baseline.parquet", "summary.json", "histogram.png", "report.html", "registry.json", "trained.index",
    "trained.json", "_ledger.json", "manifest.json", ".ivfdata", ".f16", "_lock.json", "_stats.json", "ingest.json",
    "pipeline.json", "query_inputs.parquet", "_pipeline_lock.json", "_replica", "_captions.json",
]


def string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are neither docstrings nor help text (``help=`` arguments)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            skip.update(id(n) for n in ast.walk(node.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_format_names_are_spelled_only_in_the_layout_modules():
    found = []
    for path in sorted(PIPELINE.rglob("*.py")):
        if LAYOUT in path.parents:
            continue
        for line, text in string_constants(ast.parse(path.read_text())):
            for name in FORMAT_NAMES:
                if name in text:
                    found.append(f"{path.relative_to(PIPELINE.parent)}:{line}: {name!r} in {text!r}")
    assert not found, "format names outside pipeline/layout/:\n" + "\n".join(found)


def test_the_layout_modules_define_every_format_name():
    spelled = " ".join(text for path in LAYOUT.glob("*.py")
                       for _, text in string_constants(ast.parse(path.read_text())))
    missing = [name for name in FORMAT_NAMES if name not in spelled]
    assert not missing, missing


def test_no_module_shadows_the_standard_library():
    import sys

    clashes = sorted(p.stem for p in PIPELINE.rglob("*.py") if p.stem in sys.stdlib_module_names)
    assert not clashes, f"pipeline modules named like standard modules: {clashes}"


def test_every_benchmark_script_loads():
    """A refactor of the library must not break a benchmark unnoticed: each script imports what it
    uses and answers --help."""
    import subprocess
    import sys

    failed = []
    for script in sorted((PIPELINE.parent / "bench").glob("*.py")):
        r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or "usage" not in r.stdout:
            failed.append(f"{script.name}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    assert not failed, failed
