"""Training-health diagnostics: where gradients and activations die, over time and over layers.

    from effattn.diagnostics import GradientFlow, check

    report = check(model, (x, y), F.cross_entropy)       # a few recorded forward/backward passes
    print(report)                                        # tables + a summary naming where it dies
    report.plot("diag")                                  # diag-time.png, diag-layers.png (matplotlib)

    with GradientFlow(model) as flow:                    # record a training loop as it runs
        for x, y in batches:
            ...; loss.backward(); opt.step(); flow.step(loss)
    flow.report()

* GradientFlow (recorder.py): forward hooks and tensor hooks, removed on exit; per layer the norms
  of outputs and gradients, zero and dead units, saturation; per timestep ||dL/dh_t|| for RNNs,
  attention modules and watched tensors.
* check (check.py): runs the passes, leaves the model as it found it.
* Report (report.py): the records, the summary, to_dict(), plot().
* stats.py: the measures themselves (norms, zero counts, the geometric decay fit).
* attention_stats (attention.py): per query row the entropy, largest weight and effective
  number of keys of the attention weights, from the fused kernels at O(L) memory.
"""
from .attention import AttentionStats, attention_stats
from .check import check
from .recorder import GradientFlow
from .report import LayerRecord, Report, TimeRecord

__all__ = ["GradientFlow", "check", "Report", "LayerRecord", "TimeRecord", "attention_stats", "AttentionStats"]
