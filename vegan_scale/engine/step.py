"""One optimizer step: the POT objective over this process's micro-batches, then the critic's step (WAE-GAN).

Each micro-batch runs inside ``accelerator.accumulate``: gradients add up (without a DDP all-reduce) until the
last micro-batch of the step, where the modules synchronise and step. The auto-encoder and the latent critic are
separately wrapped modules with their own optimizers; each sees exactly one forward and one backward per
micro-batch, and the encoder's adversarial term uses the critic's parameters as constants. The random numbers of
each sample are those of its place in the global batch (vegan_scale.noise), whatever the world size and split.
"""

from __future__ import annotations

import torch

from vegan_scale.engine.feed import DataFeed
from vegan_scale.engine.run import Run
from vegan_scale.noise import StepNoise


def train_step(run: Run, feed: DataFeed, lr_scale: float) -> dict[str, torch.Tensor]:
    """Run step ``run.step``; returns its loss terms (means over the micro-batches, still on the device)."""
    acc, pot, ae, critic = run.accelerator, run.objective, run.modules.autoencoder, run.modules.critic
    layout, sums = run.layout, dict[str, torch.Tensor]()
    for m in range(layout.accumulation):
        x = feed.next().to(ae.input_dtype)
        first = acc.process_index * layout.per_process + m * layout.micro  # the global index of its first sample
        noise = StepNoise(run.cfg.run.seed, run.step, range(first, first + len(x)), layout.global_batch)
        with acc.accumulate(*run.modules.wrapped), acc.autocast():
            terms = pot(ae.module, x, noise)
            ae.backward(terms.loss)
            ae.step(run.cfg.optim.lr * lr_scale)
            values = {"train/loss": terms.loss, "train/recon": terms.reconstruction, "train/penalty": terms.penalty}
            if critic is not None:
                z_q = terms.out.codes.z.detach()
                if pot.penalty.reencode:  # the official order: the codes of the auto-encoder just updated
                    with torch.no_grad():
                        z_q = ae.module(x, noise).codes.z
                critic_loss = pot.penalty.critic_loss(critic.module, z_q, terms.z_prior)
                critic.backward(critic_loss)
                critic.step(pot.penalty.critic_lr * lr_scale)
                values["train/critic_loss"] = critic_loss
        for key, value in values.items():
            sums[key] = sums.get(key, 0) + value.detach().double()  # a float64 run keeps its precision
    return {key: total / run.layout.accumulation for key, total in sums.items()}
