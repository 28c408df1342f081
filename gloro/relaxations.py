"""Relaxed robustness: certified top-`k` sets instead of a certified class.

Leino & Fredrikson, "Relaxing Local Robustness" (NeurIPS 2021). Where a
GloRo Net certifies that no input within `epsilon` changes the top class,
these networks certify the *set* `T` of the top-`k'` classes: no input within
`epsilon` lifts a class outside `T` above any class inside it. That lets a
point between two confusable classes (a cat that may be a dog) be certified
as "one of these", instead of being rejected.

* `RtkGloroNet` (relaxed top-`k` robustness): any top-`k'` set, `k' <= k`.
* `AffinityGloroNet` (affinity robustness): only top-`k'` sets equal to one
  of the user's affinity sets (e.g. "vehicles", "animals").

Both output the `m` logits and a ⊥ logit placed so that the classes strictly
above ⊥ are exactly the largest certified set (none when nothing is
certified); see `gloro.certificates.add_relaxed_bottom_logit`. The argmax of
the output is the top class where some set is certified, ⊥ otherwise; the
metrics `"rtk_vra"`, `"affinity_vra"` and `"certified_k"` read the set, and
`gloro.certificates.certified_top_k` gives its size per point. With `k = 1`
or singleton affinity sets, both make exactly a `GloroNet`'s decisions.
"""

import keras
import numpy as np

from gloro import certificates
from gloro.model import DEFAULT_POWER_ITERATIONS, GloroNet


@keras.saving.register_keras_serializable(package="gloro")
class RtkGloroNet(GloroNet):
    """A GloRo Net certifying relaxed top-`k` (RTK) robustness.

    At each input, the largest `k' <= k` such that no input within L2
    distance `epsilon` lifts a class outside the top-`k'` set above a class
    inside it is certified. Training, freezing of the Lipschitz constants,
    saving and export work as for `GloroNet`.

    Args:
        inputs, outputs: as for a functional `keras.Model` (the logits model).
        model: alternatively, an existing logits model.
        epsilon: the certified L2 radius, a number >= 0.
        k: the largest certified set size, an int with `1 <= k < m` (`m`
            classes); `k = 1` is a plain `GloroNet`.
        power_iterations: as for `GloroNet`.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Returns:
        The model's outputs are `(n, m + 1)`: the `m` logits, then ⊥, with
        the certified top-`k'` classes strictly above ⊥ and the others not.

    Raises:
        ValueError: `k` is not an int with `1 <= k < m`.

    Example:

    ```python
    x = keras.Input((2,))
    z = gloro.layers.Dense(32)(x)
    z = gloro.layers.MinMax()(z)
    y = gloro.layers.Dense(4)(z)
    g = gloro.relaxations.RtkGloroNet(x, y, epsilon=0.2, k=2)
    g.compile(optimizer="adam", loss="sparse_crossentropy",
              metrics=["rtk_vra", "certified_k", "vra"])
    g.fit(x_train, y_train, epochs=10)
    gloro.certificates.certified_top_k(g.predict(x_test))  # 0, 1 or 2 per point
    ```
    """

    def __init__(self, inputs=None, outputs=None, *, model=None, epsilon, k,
                 power_iterations=DEFAULT_POWER_ITERATIONS, **kwargs):
        super().__init__(inputs, outputs, model=model, epsilon=epsilon,
                         power_iterations=power_iterations, **kwargs)
        self._k = certificates.check_relaxation_k(k, self.num_classes)

    @property
    def k(self):
        """The largest certified set size (fixed: compiled steps bake it in)."""
        return self._k

    def _add_bottom_logit(self, logits, margin_lipschitz, epsilon, certify):
        return certificates.add_relaxed_bottom_logit(logits, margin_lipschitz, epsilon, self._k, certify)

    def get_config(self):
        return {**super().get_config(), "k": self._k}


def _affinity_matrix(affinity_sets, num_classes):
    """Validates affinity sets and returns their `(s, m)` 0/1 membership."""
    if isinstance(affinity_sets, (str, bytes)) or not isinstance(affinity_sets, (list, tuple)) or not affinity_sets:
        raise ValueError(f"affinity_sets must be a non-empty list of lists of class indices, got {affinity_sets!r}.")
    matrix = np.zeros((len(affinity_sets), num_classes), np.int32)
    for row, members in enumerate(affinity_sets):
        if isinstance(members, (str, bytes)) or not isinstance(members, (list, tuple)) or not members:
            raise ValueError(f"Affinity set {row} must be a non-empty list of class indices, got {members!r}.")
        for c in members:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes:
                raise ValueError(
                    f"Affinity set {row} {list(members)!r} holds {c!r}, not a class index in "
                    f"0..{num_classes - 1}."
                )
        if len(set(members)) != len(members):
            raise ValueError(f"Affinity set {row} {list(members)!r} lists a class twice.")
        if len(members) >= num_classes:
            raise ValueError(
                f"Affinity set {row} {list(members)!r} holds all {num_classes} classes; a set "
                "certifies something only if it leaves a class out."
            )
        matrix[row, list(members)] = 1
    return matrix


@keras.saving.register_keras_serializable(package="gloro")
class AffinityGloroNet(GloroNet):
    """A GloRo Net certifying affinity robustness.

    Like `RtkGloroNet`, but a top-`k'` set of classes is certified only if it
    equals (as a set) one of `affinity_sets`; `k` is the largest set size.
    Include the singletons `[c]` of the classes that should also be
    certifiable alone.

    Args:
        inputs, outputs: as for a functional `keras.Model` (the logits model).
        model: alternatively, an existing logits model.
        epsilon: the certified L2 radius, a number >= 0.
        affinity_sets: list of lists of class indices: non-empty, no class
            twice in a set, and fewer than `m` classes per set.
        power_iterations: as for `GloroNet`.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Returns:
        The model's outputs are `(n, m + 1)`: the `m` logits, then ⊥, with
        the classes of the certified affinity set strictly above ⊥ and the
        others not.

    Raises:
        ValueError: a bad affinity set (the message names it).

    Example:

    ```python
    # Classes 0, 1: vehicles; 2, 3: animals.
    g = gloro.relaxations.AffinityGloroNet(
        x, y, epsilon=0.2, affinity_sets=[[0], [1], [2], [3], [0, 1], [2, 3]])
    g.compile(optimizer="adam", loss="sparse_crossentropy",
              metrics=["affinity_vra", "certified_k", "vra"])
    ```
    """

    def __init__(self, inputs=None, outputs=None, *, model=None, epsilon, affinity_sets,
                 power_iterations=DEFAULT_POWER_ITERATIONS, **kwargs):
        super().__init__(inputs, outputs, model=model, epsilon=epsilon,
                         power_iterations=power_iterations, **kwargs)
        self._affinity = _affinity_matrix(affinity_sets, self.num_classes)
        self._affinity_sets = [[int(c) for c in members] for members in affinity_sets]
        self._k = int(self._affinity.sum(axis=1).max())

    @property
    def affinity_sets(self):
        """The affinity sets, as lists of class indices."""
        return [list(members) for members in self._affinity_sets]

    @property
    def k(self):
        """The largest affinity set size."""
        return self._k

    def _add_bottom_logit(self, logits, margin_lipschitz, epsilon, certify):
        return certificates.add_relaxed_bottom_logit(
            logits, margin_lipschitz, epsilon, self._k, certify, affinity=self._affinity
        )

    def get_config(self):
        return {**super().get_config(), "affinity_sets": self.affinity_sets}
