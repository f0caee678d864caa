"""DDP communication hooks: optional half-width gradients, and a timer that reports allreduce time per step.

DDP all-reduces gradients in buckets while backward still runs, so "allreduce time" is not a span one
can time around a call. The timer wraps the hook: each bucket's interval runs from its hand-off to
the allreduce until its result is ready, and a step's allreduce time is the union of those intervals
(time with at least one allreduce in flight), whether or not backward overlapped it.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

# ray.grad_compression: gradients cast to half width for the allreduce, back to fp32 after (gloo and NCCL).
HOOKS = {"none": default_hooks.allreduce_hook, "bf16": default_hooks.bf16_compress_hook,
         "fp16": default_hooks.fp16_compress_hook}


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


class AllreduceTimer:
    """One instance serves every DDP module of a rank: `register(model)`, call `end_step()` after each
    step and `collect()` at log time.

    On CPU (gloo) the interval ends are wall-clock times. On CUDA (NCCL) a Future's callback runs once
    the kernels are queued, not done, so the ends are CUDA events: the start on the stream that hands
    the bucket over, the end on the stream the callback is given, which waits for the allreduce.
    """

    def __init__(self, compression: str = "none"):
        self.inner = HOOKS[compression]
        self._step: list[list] = []  # [start, end] per bucket of the current step
        self._steps: list[list[list]] = []

    def register(self, model: torch.nn.Module) -> None:
        model.register_comm_hook(None, self.hook)

    @staticmethod
    def _now(cuda: bool):
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def hook(self, state, bucket):
        cuda = bucket.buffer().is_cuda
        span = [self._now(cuda), None]
        self._step.append(span)

        def done(fut):
            span[1] = self._now(cuda)
            return fut.value()

        return self.inner(state, bucket).then(done)

    def end_step(self) -> None:
        self._steps.append(self._step)
        self._step = []

    def collect(self) -> dict[str, float]:
        """Mean allreduce milliseconds and buckets per step since the last call (empty if no step ran)."""
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        spans = [s for step in steps for s in step]
        if spans and not isinstance(spans[0][0], float):
            torch.cuda.synchronize()
            ref = spans[0][0]
            for s in spans:  # CUDA events -> ms since the first start
                s[:] = [ref.elapsed_time(s[0]), ref.elapsed_time(s[1])]
        else:
            for s in spans:
                s[:] = [s[0] * 1e3, s[1] * 1e3]
        return {"allreduce_ms": sum(busy_time(step) for step in steps) / len(steps),
                "allreduce_buckets": len(spans) / len(steps)}
