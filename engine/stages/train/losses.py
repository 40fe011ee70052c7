"""Training objectives: a per-sample loss, then an aggregate over the batch.

Per-sample losses are cross-entropy, or beta * CE + (1 - beta) * SupCon (the paper's loss,
used wherever the encoder trains: SupCon acts on the encoder's features, so on a frozen
encoder it is a constant, and engine.stages.train.methods leaves it out there). Aggregates are the plain mean, or Group-DRO's robust loss. Each
aggregate owns its whole state (Group-DRO's group weights q), saves and restores it with
the checkpoint, and the train loop calls it without knowing which one it holds, as in the
reference implementation's ``LossComputer``.

Under DDP, Group-DRO's group losses are the means over the *global* batch: the workers
all-reduce per-group sums and counts, so every worker updates the same q, and the local
loss is scaled so that DDP's gradient average equals the gradient of the global robust loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def supcon_per_sample(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., the L_out form) of each anchor in the batch.

    Features are L2-normalised here. Positives of an anchor are the other samples of its
    class; an anchor without a positive in the batch has loss 0.
    """
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    # Exclude each anchor from its own denominator (and keep exp() finite).
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -summed / n_pos.clamp(min=1)


class CrossEntropy:
    """Plain per-sample cross-entropy on the head's logits."""

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def describe(self) -> str:
        return "CE"


class CrossEntropySupCon:
    """beta * CE + (1 - beta) * SupCon, per sample (SupCon on the encoder's features)."""

    def __init__(self, beta: float, temperature: float):
        self.beta, self.temperature = beta, temperature

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels, reduction="none")
        if self.beta >= 1.0:
            return ce
        return self.beta * ce + (1.0 - self.beta) * supcon_per_sample(features, labels, self.temperature)

    def describe(self) -> str:
        return "CE" if self.beta >= 1.0 else f"{self.beta:g} CE + {1.0 - self.beta:g} SupCon"


class MeanLoss:
    """ERM: the batch mean. Stateless."""

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return losses.mean()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def stats(self) -> dict:
        return {}


class GroupDROLoss:
    """Group-DRO's robust loss with the reference implementation's semantics.

    Per batch: mean loss per group (an empty group counts 0); the adjustment C / sqrt(n_g)
    (n_g = the group's training count) is added to each group's loss; then
    q <- q * exp(eta * loss_g), renormalised; the loss is sum_g q_g * loss_g with q constant.
    As in the reference, the adjusted group losses are both the exponent and the loss; the
    adjustment is a constant, so it changes q but not the gradient of a given q.
    """

    def __init__(self, n_groups: int, train_group_counts, eta: float, adjustment: float = 0.0):
        self.n_groups = n_groups
        self.eta = eta
        counts = torch.as_tensor(list(train_group_counts), dtype=torch.float32)
        if counts.numel() != n_groups:
            raise ValueError(f"train_group_counts has {counts.numel()} entries for {n_groups} groups")
        # A group with no training images never appears, so it gets no adjustment (not 1/0).
        self.adjustment = torch.where(counts > 0, adjustment / counts.clamp(min=1).sqrt(), torch.zeros_like(counts))
        self.q = torch.full((n_groups,), 1.0 / n_groups)
        self.last_group_loss = torch.zeros(n_groups)

    def __call__(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        device = losses.device
        group_ids = torch.arange(self.n_groups, device=device)
        group_map = (groups.view(1, -1) == group_ids.view(-1, 1)).to(losses.dtype)
        local_sum = group_map @ losses.view(-1)
        count = group_map.sum(1)
        world = 1
        summed, total = local_sum.detach().clone(), count.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            dist.all_reduce(summed)
            dist.all_reduce(total)
        denom = total + (total == 0).to(total.dtype)  # empty group: loss 0, not NaN
        adjustment = self.adjustment.to(device)
        global_loss = summed / denom + adjustment
        q = self.q.to(device) * torch.exp(self.eta * global_loss)
        self.q = (q / q.sum()).detach()
        self.last_group_loss = global_loss.detach().cpu()
        # Each worker's share: averaged over workers (as DDP averages gradients) it is the
        # global mean loss of each group.
        group_loss = local_sum * world / denom + adjustment
        return group_loss @ self.q

    def state_dict(self) -> dict:
        return {"q": self.q.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.q = state["q"].detach().cpu().clone()

    def stats(self) -> dict:
        q = self.q.detach().cpu()
        return {f"q_{g}": float(q[g]) for g in range(self.n_groups)}
