"""A class-conditioned VAE for 8x8 digits, with the train step and EMA the Flax guides build up to.

Encoder and decoder both see the digit class (one-hot). The reparameterisation
draws its noise from an ``nnx.Rngs`` stream kept in the model, so the noise is
state that advances on every call, on the device as in eager NNX.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

IMAGE_DIM, NUM_CLASSES = 64, 10


class Encoder(nnx.Module):
  def __init__(self, hidden: int, latent: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IMAGE_DIM + NUM_CLASSES, hidden, rngs=rngs)
    self.mean = nnx.Linear(hidden, latent, rngs=rngs)
    self.logvar = nnx.Linear(hidden, latent, rngs=rngs)

  def __call__(self, images: jax.Array, onehot: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = nnx.relu(self.hidden(jnp.concatenate([images, onehot], axis=-1)))
    return self.mean(h), self.logvar(h)


class Decoder(nnx.Module):
  def __init__(self, hidden: int, latent: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(latent + NUM_CLASSES, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, IMAGE_DIM, rngs=rngs)

  def __call__(self, z: jax.Array, onehot: jax.Array) -> jax.Array:
    """Pixel logits."""
    return self.out(nnx.relu(self.hidden(jnp.concatenate([z, onehot], axis=-1))))


class ConditionalVAE(nnx.Module):
  """``model(images, labels) -> (logits, mean, logvar)``; ``generate(z, labels)`` -> images in [0, 1]."""

  def __init__(self, hidden: int = 128, latent: int = 8, *, rngs: nnx.Rngs):
    self.encoder = Encoder(hidden, latent, rngs=rngs)
    self.decoder = Decoder(hidden, latent, rngs=rngs)
    self.noise = nnx.Rngs(noise=rngs.params())  # the reparameterisation's own stream
    self.latent = latent

  def __call__(self, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    onehot = jax.nn.one_hot(labels, NUM_CLASSES)
    mean, logvar = self.encoder(images, onehot)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.noise.noise(), mean.shape)
    return self.decoder(z, onehot), mean, logvar

  def generate(self, z: jax.Array, labels: jax.Array) -> jax.Array:
    return nnx.sigmoid(self.decoder(z, jax.nn.one_hot(labels, NUM_CLASSES)))


def vae_loss(model: ConditionalVAE, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Reconstruction (Bernoulli cross-entropy per image) plus the KL divergence to N(0, I)."""
  logits, mean, logvar = model(images, labels)
  reconstruction = optax.sigmoid_binary_cross_entropy(logits, images).sum(-1).mean()
  kl = -0.5 * jnp.mean(jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1))
  return reconstruction + kl


class EmaParam(nnx.Variable):
  """An exponential moving average of a Param, kept beside it."""


class EMA(nnx.Module):
  """EMA copies of a model's Params, updated with ``optax.incremental_update``."""

  def __init__(self, model: nnx.Module, decay: float = 0.99):
    self.decay = decay
    self.params = nnx.data(jax.tree.map(EmaParam, nnx.to_pure_dict(nnx.state(model, nnx.Param))))

  def update(self, model: nnx.Module) -> None:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    averaged = optax.incremental_update(params, self.averaged(), step_size=1.0 - self.decay)
    jax.tree.map(lambda variable, value: variable.set_value(value), self.params, averaged, is_leaf=_is_variable)

  def averaged(self) -> dict:
    """The EMA values as a pure dict, for ``nnx.update(model, ema.averaged())``."""
    return jax.tree.map(lambda variable: variable.get_value(), self.params, is_leaf=_is_variable)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def vae_optimizer(model: ConditionalVAE, *, steps: int, peak_lr: float = 3e-3, wrt=nnx.Param) -> nnx.Optimizer:
  """Adam with warmup then cosine decay, after clipping the global gradient norm to 1."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps=max(1, steps // 10), decay_steps=steps)
  return nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), wrt=wrt)


def vae_train_step(model: ConditionalVAE, optimizer: nnx.Optimizer, ema: EMA, images, labels) -> jax.Array:
  loss, grads = nnx.value_and_grad(vae_loss, argnums=nnx.DiffState(0, optimizer.wrt))(model, images, labels)
  optimizer.update(model, grads)
  ema.update(model)
  return loss
