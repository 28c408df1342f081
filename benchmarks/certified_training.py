"""The training each certifier pairs with, as Keras models that `fit` trains:
GloRo, IBP (Gowal et al. 2018), CROWN-IBP (Zhang et al. 2020), KW (Wong &
Kolter 2018, with the linear bounds of `bounds.py`), BCP (Lee et al. 2020,
one power-iteration step per layer and training step, as its paper trains),
and Gaussian noise for randomized smoothing (Cohen et al. 2019).

The bound-based losses follow Gowal et al.: `kappa * CE(f(x), y) +
(1 - kappa) * CE(z, y)` where `z_i = -lower(f_y - f_i)` are the worst-case
logits the bounds allow (`z_y = 0`). CROWN-IBP mixes its bound with IBP's,
`beta * crown_ibp + (1 - beta) * ibp`, as its paper does; the paper anneals
`beta` from 1 to 0 and `eps` from 0 up, while here both stay fixed, which
changes the accuracy of a short run but not the cost of a step (both bounds
are computed at every step until the very end of the paper's schedule).
"""

import keras
from keras import ops

import gloro
from benchmarks import bounds

KAPPA = 0.5
BETA = 0.5


class BoundTrainer(keras.Model):
    """Trains a logits model on a bound-propagation loss.

    Args:
        model: the logits model (weights shared, not copied).
        method: `"ibp"`, `"crown_ibp"`, `"kw"` or `"bcp"` (which needs the
            linear layers to be `gloro.layers` ones: it trains with their
            power iteration).
        epsilon: the L2 radius of the training bound.
        chunk: hidden units per backward pass for `"kw"`.
    """

    def __init__(self, model, method, epsilon, chunk=4096, **kwargs):
        super().__init__(**kwargs)
        self.f = model
        self.method = method
        self.epsilon = float(epsilon)
        self.chunk = chunk
        self._steps, self._shapes = bounds.chain(model)

    def call(self, x, training=False):
        return self.f(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        labels = ops.cast(ops.reshape(y, (-1,)), "int32")
        if self.method == "crown_ibp":
            lower = BETA * bounds.margin_bounds("crown_ibp", self._steps, self._shapes, x, self.epsilon, labels)
            lower = lower + (1 - BETA) * bounds.margin_bounds("ibp", self._steps, self._shapes, x, self.epsilon, labels)
        elif self.method == "bcp":
            norms = bounds.estimated_norms(self._steps)
            lower = bounds.margin_bounds("bcp", self._steps, self._shapes, x, self.epsilon, labels, norms=norms)
        else:
            lower = bounds.margin_bounds(self.method, self._steps, self._shapes, x, self.epsilon, labels, self.chunk)
        clean = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        robust = keras.losses.sparse_categorical_crossentropy(labels, -lower, from_logits=True)
        return ops.mean(KAPPA * clean + (1 - KAPPA) * robust)


def trainer(method, model, epsilon, sigma=None, chunk=4096):
    """A compiled Keras model that trains `model` for a certifier.

    Args:
        method: `"gloro"`, `"ibp"`, `"crown_ibp"`, `"kw"`, `"bcp"` or `"noise"`
            (Gaussian data augmentation for randomized smoothing).
        model: the logits model; the trainer shares its weights.
        epsilon: the L2 radius to train for (bound methods, GloRo).
        sigma: the noise level (`"noise"`).
        chunk: hidden units per backward pass (`"kw"`).

    Returns:
        a compiled `keras.Model`; after `fit`, `model` holds the weights
        (for `"gloro"`, the returned `GloroNet` uses a copy in `.f`).
    """
    if method == "gloro":
        g = gloro.GloroNet(model=model, epsilon=epsilon)
        g.compile(optimizer=keras.optimizers.Adam(1e-3), loss="crossentropy")
        return g
    if method == "noise":
        noisy = keras.Sequential([keras.Input(model.input_shape[1:]), keras.layers.GaussianNoise(sigma), model])
        noisy.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return noisy
    bound = BoundTrainer(model, method, epsilon, chunk)
    bound.compile(optimizer=keras.optimizers.Adam(1e-3))
    return bound
