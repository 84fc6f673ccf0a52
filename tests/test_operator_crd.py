"""The CRD schema mirrors embedjob/spec.py: same fields, defaults, enums, bounds and patterns, and
nothing a 1.20 apiserver cannot load (no CEL rules)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from embedjob import spec as sp

CRD = Path(__file__).resolve().parents[1] / "crds" / "embeddingjobs.embedjob.io.yaml"


def load() -> dict:
    return yaml.safe_load(CRD.read_text())


def spec_schema() -> dict:
    [version] = load()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_names_and_status_subresource():
    crd = load()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{sp.PLURAL}.{sp.API_GROUP}"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (sp.KIND, sp.PLURAL, ["ej"])
    [version] = crd["spec"]["versions"]
    assert version["name"] == sp.API_VERSION and version["subresources"] == {"status": {}}
    cols = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Images", "Images/s", "Age", "Failed"} <= set(cols)
    assert cols["Failed"]["priority"] == 1 and cols["Progress"]["jsonPath"] == ".status.progress"
    assert "x-kubernetes-validations" not in CRD.read_text()


def test_fields_mirror_the_spec_dataclasses():
    s = spec_schema()
    assert set(s["properties"]) == {f.name for f in fields(sp.JobSpec)}
    assert s["required"] == ["input", "output"]
    for name, cls in (("output", sp.OutputSpec), ("model", sp.ModelSpec), ("inference", sp.InferenceSpec),
                      ("storage", sp.StorageSpec), ("retries", sp.RetrySpec)):
        assert set(s["properties"][name]["properties"]) == {f.name for f in fields(cls)}, name
    assert set(s["properties"]["input"]["properties"]) == {"uri", "shards"}


def test_defaults_enums_bounds_and_patterns_match():
    s = spec_schema()["properties"]
    inf, d = s["inference"]["properties"], sp.InferenceSpec()
    for key in ("batchSize", "precision", "device", "numThreads", "maxImagePixels", "preprocessing", "compile"):
        assert inf[key]["default"] == getattr(d, key), key
    assert tuple(inf["preprocessing"]["enum"]) == sp.PREPROCESSINGS
    assert tuple(inf["compile"]["enum"]) == sp.COMPILE_MODES
    assert (inf["batchSize"]["minimum"], inf["batchSize"]["maximum"]) == (0, 4096)
    assert (inf["numThreads"]["minimum"], inf["numThreads"]["maximum"]) == (0, 256)
    assert tuple(inf["precision"]["enum"]) == sp.PRECISIONS and tuple(inf["device"]["enum"]) == sp.DEVICES
    assert tuple(s["output"]["properties"]["dtype"]["enum"]) == sp.DTYPES
    assert s["output"]["properties"]["dtype"]["default"] == sp.OutputSpec(uri="x").dtype
    r, rd = s["retries"]["properties"], sp.RetrySpec()
    assert (r["perShard"]["default"], r["perShard"]["minimum"], r["perShard"]["maximum"]) == (rd.perShard, 0, 100)
    assert (r["backoffSeconds"]["default"], r["backoffSeconds"]["maximum"]) == (rd.backoffSeconds, 86400)
    # no default name in the schema: a model.path alone must not be given a hub id (the operator applies
    # the default only when neither name nor path is set)
    assert "default" not in s["model"]["properties"]["name"] and sp.ModelSpec().name == sp.DEFAULT_MODEL
    assert s["onTruncatedShard"]["enum"] == list(sp.ON_TRUNCATED) and s["onTruncatedShard"]["default"] == "record"
    assert tuple(s["outputs"]["items"]["enum"]) == sp.OUTPUT_KINDS and s["outputs"]["default"] == ["image"]
    assert set(s["text"]["properties"]) == set(sp.TextSpec.__dataclass_fields__)
    assert s["queue"]["default"] == "embedjob" and s["queue"]["pattern"] == sp.QUEUE_NAME.pattern
    assert s["input"]["properties"]["uri"]["pattern"] == sp.S3_URI.pattern
    assert s["output"]["properties"]["uri"]["pattern"] == sp.S3_URI.pattern
    for key in ("maxFailedShards", "parallelism", "ttlSecondsAfterFinished"):
        assert s[key]["minimum"] == 0


def test_example_job_is_valid():
    doc = yaml.safe_load((CRD.parents[1] / "examples" / "job.yaml").read_text())
    job = sp.parse_job(doc, allow_local=False)
    assert job.spec.input.uri.startswith("s3://") and job.spec.output.uri.startswith("s3://")
