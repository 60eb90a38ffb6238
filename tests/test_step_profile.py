"""bench/step_profile.py's attribution of kernels to model parts (pure functions, no profiler)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.step_profile import breakdown, classify, hlo_op_names  # noqa: E402

HLO = """HloModule jit_train_step

%fused_computation.7 (param_0: bf16[8,64]) -> bf16[8,64] {
  %param_0 = bf16[8,64]{1,0} parameter(0)
  ROOT %multiply.3 = bf16[8,64]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(train_step)/transpose(jvp())/while/body/checkpoint/polynorm/mul"}
}

ENTRY %main.9 (p: bf16[8,64]) -> bf16[8,64] {
  %p = bf16[8,64]{1,0} parameter(0)
  %loop_multiply_fusion.2 = bf16[8,64]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.7
  ROOT %custom-call.4 = bf16[8,64]{1,0} custom-call(%loop_multiply_fusion.2), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/optimizer/dot_general"}
}
"""


def test_hlo_op_names_reads_metadata_and_inherits_it_into_fusions():
  names = hlo_op_names(HLO)
  assert names["custom-call.4"] == "jit(train_step)/optimizer/dot_general"
  assert names["custom_call_4"] == names["custom-call.4"]  # as kernel names spell it
  assert names["loop_multiply_fusion.2"].endswith("checkpoint/polynorm/mul")  # from its computation


def test_classify_by_innermost_scope_and_phase():
  prefix = "jit(train_step)/"
  assert classify(prefix + "jvp()/while/body/attention_core/gda_forward/pallas_call") == (
      "attention_core", "forward")
  assert classify(prefix + "transpose(jvp())/while/body/checkpoint/rematted_computation/mlp_matmuls/"
                  "dot_general") == ("mlp_matmuls", "recompute")
  assert classify(prefix + "transpose(jvp())/while/body/checkpoint/polynorm/polynorm_backward") == (
      "polynorm", "backward")
  assert classify(prefix + "optimizer/jit(_where)/select_n") == ("optimizer", "update")
  assert classify("") == ("other", "forward")


def test_breakdown_sums_per_part_and_counts_overlap_once():
  names = hlo_op_names(HLO)
  events = [  # (kernel name, start ns, duration ns, hlo op): two steps
      ("nvjet_gemm", 0, 4_000_000, "custom-call.4"),
      ("loop_multiply_fusion_2", 1_000_000, 2_000_000, "loop_multiply_fusion_2"),  # overlaps
      ("nvjet_gemm", 10_000_000, 4_000_000, "custom-call.4"),
  ]
  table, top, busy_ms = breakdown(events, names, steps=2)
  assert table[("optimizer", "update")] == {"ms": 4.0, "matmul_ms": 4.0}
  assert table[("polynorm", "backward")] == {"ms": 1.0, "matmul_ms": 0.0}
  assert busy_ms == 4.0  # (4 + 4 ms of busy time, the overlapped 2 ms once) / 2 steps
  assert top[0]["kernel"] == "nvjet_gemm" and top[0]["count"] == 2
