"""docs/multi_machine.md: the Kubeflow TFJob manifest parses, and the TF_CONFIG
the training operator derives from it (and the hand-written one) is one
``tf_async.cluster.parse_tf_config`` accepts for every replica."""

from __future__ import annotations

import json
import os
import re

import pytest

from tf_async import cluster

yaml = pytest.importorskip("yaml")  # the `test` extra installs PyYAML

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "multi_machine.md")
PORT_NAME = "tfjob-port"  # the training operator's default port name
JOB_OF_REPLICA = {"Chief": "chief", "Worker": "worker", "PS": "ps"}


def _blocks(language):
    with open(DOC) as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), re.M | re.S)


def _manifest():
    (text,) = _blocks("yaml")
    documents = list(yaml.safe_load_all(text))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"TFJob", "NetworkPolicy"}
    return by_kind["TFJob"], by_kind["NetworkPolicy"]


def _operator_tf_configs(tfjob):
    """TF_CONFIG per pod as the Kubeflow training operator writes it:
    ``<job>-<type>-<index>.<namespace>.svc:<tfjob-port>`` per replica."""
    name, namespace = tfjob["metadata"]["name"], tfjob["metadata"]["namespace"]
    specs = tfjob["spec"]["tfReplicaSpecs"]
    cluster_spec = {}
    for replica_type, spec in specs.items():
        (container,) = [c for c in spec["template"]["spec"]["containers"]
                        if c["name"] == "tensorflow"]
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == PORT_NAME]
        job = JOB_OF_REPLICA[replica_type]
        cluster_spec[job] = [f"{name}-{job}-{i}.{namespace}.svc:{port}"
                             for i in range(spec["replicas"])]
    return {
        (job, index): json.dumps({"cluster": cluster_spec,
                                  "task": {"type": job, "index": index},
                                  "environment": "cloud"})
        for job, addresses in cluster_spec.items() for index in range(len(addresses))
    }


def test_tfjob_manifest_is_valid_and_implies_a_valid_tf_config():
    tfjob, policy = _manifest()
    assert tfjob["apiVersion"] == "kubeflow.org/v1"
    specs = tfjob["spec"]["tfReplicaSpecs"]
    assert set(specs) == {"Chief", "Worker", "PS"}
    assert specs["Chief"]["replicas"] == 1 and specs["PS"]["replicas"] >= 1
    images = {c["image"] for s in specs.values() for c in s["template"]["spec"]["containers"]}
    assert len(images) == 1  # one script, one image, every role
    configs = _operator_tf_configs(tfjob)
    assert len(configs) == sum(s["replicas"] for s in specs.values())
    for (job, index), text in configs.items():
        parsed = cluster.parse_tf_config(text)
        assert parsed["task"] == {"type": job, "index": index}
        assert set(parsed["cluster"]) == {"chief", "worker", "ps"}
    # The chief's TF_CONFIG shown in the doc is the one the operator writes.
    (shown,) = [b for b in _blocks("json") if '"task"' in b]
    chief = json.loads(configs[("chief", 0)])
    assert json.loads(shown.replace('"...", ', ""))["cluster"]["ps"] == chief["cluster"]["ps"]
    for address in chief["cluster"]["chief"] + chief["cluster"]["worker"][::3]:
        assert address in shown
    # Only the job's own pods may reach its servers.
    label = {"training.kubeflow.org/job-name": tfjob["metadata"]["name"]}
    assert policy["metadata"]["namespace"] == tfjob["metadata"]["namespace"]
    assert policy["spec"]["podSelector"]["matchLabels"] == label
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": label}}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_hand_written_tf_config_is_valid():
    (text,) = [b for b in _blocks("bash") if "CLUSTER=" in b]
    cluster_json = re.search(r"CLUSTER='(.*)'", text).group(1)
    tasks = re.findall(r'\\"type\\": \\"(\w+)\\", \\"index\\": (\d)', text)
    assert sorted(tasks) == [("chief", "0"), ("ps", "0"), ("worker", "0"), ("worker", "1")]
    for job, index in tasks:
        config = f'{{"cluster": {cluster_json}, "task": {{"type": "{job}", "index": {index}}}}}'
        assert cluster.parse_tf_config(config)["task"] == {"type": job, "index": int(index)}
