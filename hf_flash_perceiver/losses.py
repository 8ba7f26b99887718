"""Losses of the heads: sums over labelled items divided by the number of items, so that they stay exact under
`Trainer`'s gradient accumulation (`num_items_in_batch`). Labels are validated against the problem type first.

Their values (class ids in range, multi-hot targets in [0, 1]) are checked on the device, and the host must read the
answer: asked at the loss, that would make the host wait for the whole forward mid-step and leave the device idle
while it then issues the loss and the backward. The heads ask before their forward instead ([`early_label_check`],
[`early_token_check`]): the answer comes to the host behind the check alone, and the loss reads it there
([`EarlyCheck`]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .configuration_perceiver import PerceiverConfig
from .input_adapters import INTEGER_DTYPES
from .input_preparation import type_name


def _mean_over_items(loss_sum: Tensor, count: Tensor | int, num_items_in_batch: Tensor | int | None) -> Tensor:
    """Turn a summed loss into a mean over labelled items.

    Under `Trainer` with gradient accumulation, `num_items_in_batch` is the number of labelled items in the whole
    accumulated batch: dividing each micro-batch's *sum* by it makes the accumulated loss (and gradient) equal to the
    full batch's mean, which a per-micro-batch mean does not when micro-batches hold different numbers of items.
    Without it, the count of this batch is used; a batch without any labelled item gives 0, not 0/0 = NaN.
    """
    if num_items_in_batch is not None:
        count = num_items_in_batch.to(loss_sum.device) if isinstance(num_items_in_batch, Tensor) else num_items_in_batch
    # No labelled item (here, or in the whole accumulated batch) means a zero sum: the loss is 0, not 0/0 = NaN.
    if isinstance(count, Tensor):
        return loss_sum / count.clamp(min=1)
    return loss_sum / max(count, 1)


class EarlyCheck:
    """Whether any entry of a boolean tensor `bad` is set, asked of the device when made and read by [`failed`]. On
    CUDA the answer travels to pinned host memory by a copy queued right behind the reduction, and [`failed`] waits on
    that copy alone (an event), not on the work queued after it: made before a forward, read at its loss, it costs the
    step no host wait. Elsewhere the answer is there at once."""

    def __init__(self, bad: Tensor) -> None:
        flag = bad.any()
        self._event = None
        if flag.is_cuda:
            self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._flag.copy_(flag, non_blocking=True)
            # On the flag's device's stream, where the copy was queued (not necessarily the current device's).
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))
        else:
            self._flag = flag

    def failed(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._flag)


def _bad_class_ids(labels: Tensor, num_classes: int) -> Tensor:
    return (labels != -100) & ((labels < 0) | (labels >= num_classes))


def _bad_multi_hot(targets: Tensor) -> Tensor:
    # `~(in range)` rather than `out of range`: NaN compares false both ways and must be refused too.
    return ~((targets >= 0) & (targets <= 1))


def early_label_check(config: PerceiverConfig, labels: Tensor | None) -> EarlyCheck | None:
    """The value check of a classification head's `labels`, started before its forward: class ids for single-label
    problems, the [0, 1] range for multi-label ones (the problem type inferred as [`classification_loss`] does). None
    where there is nothing to start: no labels, regression, labels of a type the loss refuses anyway, or under
    `torch.compile` (which checks nothing)."""
    if labels is None or not isinstance(labels, Tensor) or torch.compiler.is_compiling():
        return None
    problem_type = config.problem_type or infer_problem_type(config.num_labels, labels)
    if problem_type == "single_label_classification" and labels.dtype in INTEGER_DTYPES:
        return EarlyCheck(_bad_class_ids(labels, config.num_labels))
    if problem_type == "multi_label_classification" and labels.dtype != torch.bool and not labels.is_complex():
        return EarlyCheck(_bad_multi_hot(labels.float()))
    return None


def early_token_check(labels: Tensor | None, attention_mask: Tensor | None, vocab_size: int) -> EarlyCheck | None:
    """The value check of a masked-LM head's token-id `labels` (padded positions excluded, as [`masked_lm_loss`]
    excludes them), started before its forward; None where there is nothing to start (see [`early_label_check`])."""
    if (labels is None or not isinstance(labels, Tensor) or labels.dtype not in INTEGER_DTYPES
            or torch.compiler.is_compiling()):
        return None
    ids = labels.long()
    if isinstance(attention_mask, Tensor) and attention_mask.shape == labels.shape:
        ids = ids.masked_fill(attention_mask.to(ids.device) == 0, -100)
    return EarlyCheck(_bad_class_ids(ids, vocab_size))


def class_id_loss(
    logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None, what: str = "Class ids",
    early: EarlyCheck | None = None,
) -> Tensor:
    """Cross-entropy of `logits (n, num_classes)` against class ids `labels (n,)`; -100 marks ignored items.

    Ids out of range raise a `ValueError` here instead of an IndexError (CPU) or device-side assert (CUDA) in torch.
    `early`, the same check started before the forward, answers in place of checking here.
    """
    num_classes = logits.shape[-1]
    valid = labels != -100
    if not torch.compiler.is_compiling():
        if early.failed() if early is not None else bool(_bad_class_ids(labels, num_classes).any()):
            bad = _bad_class_ids(labels, num_classes)
            raise ValueError(
                f"{what} must be in [0, {num_classes}) or -100 (ignored), got {labels[bad].unique().tolist()[:10]}."
            )
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    return _mean_over_items(loss_sum, valid.sum(), num_items_in_batch)


def infer_problem_type(num_labels: int, labels: Tensor) -> str:
    """transformers' rule: one label is regression; integer labels are single-label classes; else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in INTEGER_DTYPES:
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(
    config: PerceiverConfig, logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None,
    early: EarlyCheck | None = None,
) -> Tensor:
    """Loss by `config.problem_type` (inferred as transformers does), with labels validated against it.

    Single-label: cross-entropy over integer class ids `(batch,)`, -100 ignored. Multi-label: BCE-with-logits over
    float multi-hot `(batch, num_labels)`. Regression: MSE over float `(batch, num_labels)` (or `(batch,)` with one
    label). Every loss is a sum over items divided by `num_items_in_batch` when given (see `_mean_over_items`).
    `early`: the labels' value check, started before the forward ([`early_label_check`]).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {type_name(labels)}.")
    batch, num_labels = logits.shape[0], config.num_labels
    problem_type = config.problem_type or infer_problem_type(num_labels, labels)
    got = f"got dtype {labels.dtype} of shape {tuple(labels.shape)}"
    if problem_type == "regression":
        shapes = [(batch, num_labels)] + ([(batch,)] if num_labels == 1 else [])
        if not labels.is_floating_point() or tuple(labels.shape) not in shapes:
            expected = " or ".join(str(s) for s in shapes)
            raise ValueError(f"Regression labels must be floating point of shape {expected}, {got}.")
        error = logits.float().view(batch, num_labels) - labels.float().view(batch, num_labels)
        loss = _mean_over_items(error.square().sum(), labels.numel(), num_items_in_batch)
    elif problem_type == "single_label_classification":
        if labels.dtype not in INTEGER_DTYPES or tuple(labels.shape) not in ((batch,), (batch, 1)):
            raise ValueError(
                f"Single-label classification labels must be integer class ids (torch.long) of shape ({batch},), "
                f"{got}. (Multi-label classification takes float multi-hot labels of shape ({batch}, {num_labels}).)"
            )
        loss = class_id_loss(logits, labels.view(batch).long(), num_items_in_batch, early=early)
    else:
        if labels.dtype == torch.bool or labels.is_complex() or tuple(labels.shape) != (batch, num_labels):
            raise ValueError(
                f"Multi-label classification labels must be float multi-hot (0/1) of shape ({batch}, {num_labels}), "
                f"{got}."
            )
        targets = labels.float()
        if not torch.compiler.is_compiling() and (
            early.failed() if early is not None else bool(_bad_multi_hot(targets).any())
        ):
            raise ValueError(
                f"Multi-label classification labels must lie in [0, 1] (no NaN), got values in "
                f"[{targets.min().item()}, {targets.max().item()}]"
                f"{' and NaN' if bool(targets.isnan().any()) else ''}."
            )
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum")
        loss = _mean_over_items(bce, labels.numel(), num_items_in_batch)
    # Remembered only once the labels fit (as transformers does): the pipelines pick softmax/sigmoid from it.
    config.problem_type = problem_type
    return loss


def dense_regression_loss(
    logits: Tensor, labels: Tensor, query_mask: Tensor | None = None, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """MSE of Perceiver IO outputs `(batch, num_queries, output_dim)` against dense targets of the same shape.

    Masked queries (`query_mask` False/0) are excluded: their targets may hold anything (NaN, -100 padding).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {type_name(labels)}.")
    if not labels.is_floating_point() or labels.shape != logits.shape:
        raise ValueError(
            "Dense regression labels must be floating point of shape (batch, num_queries, output_dim) = "
            f"{tuple(logits.shape)}, got dtype {labels.dtype} of shape {tuple(labels.shape)}."
        )
    targets = labels.float()
    if query_mask is None:
        count = targets.numel()
    else:
        valid = (query_mask != 0)[..., None]
        # Masked before the difference, so that NaN targets there cannot reach the gradient through 0 * NaN.
        targets = targets.masked_fill(~valid, 0.0)
        count = valid.sum() * targets.shape[-1]
    error = (logits.float() - targets).square().sum()
    return _mean_over_items(error, count, num_items_in_batch)


def flow_endpoint_error(flow: Tensor, labels: Tensor) -> Tensor:
    """Average end-point error: the mean over pixels of the Euclidean distance between predicted and true flow, both
    `(batch, height, width, 2)` in pixels."""
    if not isinstance(labels, Tensor) or not labels.is_floating_point():
        got = labels.dtype if isinstance(labels, Tensor) else type_name(labels)
        raise TypeError(f"Flow `labels` must be a floating-point tensor, got {got}.")
    if labels.shape != flow.shape:
        raise ValueError(
            f"Flow `labels` must have the prediction's shape (batch, height, width, 2) = {tuple(flow.shape)}, "
            f"got {tuple(labels.shape)}."
        )
    return torch.linalg.vector_norm(flow.float() - labels.float().to(flow.device), dim=-1).mean()


def masked_lm_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    early: EarlyCheck | None = None,
) -> Tensor:
    """Cross-entropy of `logits (batch, seq_len, vocab_size)` against token ids `labels (batch, seq_len)`; -100 and
    padded positions (`attention_mask` 0) are ignored. `early`: the ids' value check, started before the forward
    ([`early_token_check`])."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {type_name(labels)}.")
    if labels.dtype not in INTEGER_DTYPES or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"Masked-LM labels must be integer token ids (torch.long, -100 = ignore) of shape (batch, seq_len) = "
            f"{tuple(logits.shape[:2])}, got dtype {labels.dtype} of shape {tuple(labels.shape)}."
        )
    labels = labels.long()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    return class_id_loss(logits.flatten(0, 1), labels.flatten(), num_items_in_batch, "Masked-LM label ids", early)


__all__ = [
    "EarlyCheck", "class_id_loss", "classification_loss", "dense_regression_loss", "early_label_check",
    "early_token_check", "infer_problem_type", "masked_lm_loss",
]
