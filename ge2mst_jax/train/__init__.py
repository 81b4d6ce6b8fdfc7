"""Everything a training run needs: the train state (`state`), the step and the loop (`loop`), the
in-training evaluator (`evaluator`), checkpointing (`checkpoint`, the one module that talks to orbax),
fine-tuning (`finetune`), sharding rules and the mesh (`sharding`), run control on pods (`run_control`:
lease, preemption, watchdog), Mixup / CutMix (`mixing`), metric writers (`metrics`), profiles
(`profiling`) and the per-process reuse of compiled programs (`programs`).
"""
