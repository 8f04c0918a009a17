"""Launches of one decode step at batch 1, counted from outside on the CPU device path (every
op on its Triton kernel under the interpreter, host_counts=False; see launch_count.py), held
to issue 13's targets: a block that runs at most 8, a block the routers skip for every row at
most 1 (its route kernel, with the K/V under `compute`), under `sequence` granularity at most 1
under `compute` and 0 under `drop`, a `skip_layers` block 0, and at most 10 fixed per step
(embedding, final norm + lm_head, greedy argmax and the step's bookkeeping)."""
import os

import pytest

from launch_count import CATEGORIES, measure

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the Triton launches of the interpreter (CPU)")

TARGETS = {
    "running block (token router)": 8,
    "running block (tau 0, no router)": 8,
    "running block (sequence)": 8,
    "router-skipped block (token, compute)": 1,
    "router-skipped block (token, drop)": 1,
    "skipped block (sequence, compute)": 1,
    "skipped block (sequence, drop)": 0,
    "skip_layers block": 0,
}
FIXED_TARGET = 10


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch_models")


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("name", list(CATEGORIES))
def test_decode_step_launches(models_dir, name, merge):
    per_block, fixed = measure(models_dir, name, merge)
    assert per_block <= TARGETS[name], f"{name}: {per_block} launches per block"
    assert fixed <= FIXED_TARGET, f"{name}: {fixed} fixed launches per step"
