"""gloro: certified-robust neural networks (GloRo Nets) for Keras 3.

Example:

```python
import keras
import gloro
from gloro import layers

x = keras.Input((28, 28, 1))
z = layers.Conv2D(16, 4, strides=2, padding="same")(x)
z = layers.MinMax()(z)
z = layers.Flatten()(z)
y = layers.Dense(10)(z)
g = gloro.GloroNet(x, y, epsilon=0.3)
```
"""

from gloro import architectures, backend, callbacks, certificates, graph, layers, lipschitz, losses, metrics, schedules
from gloro.model import GloroNet
from gloro.saving import load_model, load_saved_model
from gloro import relaxations  # after GloroNet, which it subclasses

__version__ = "0.3.0"

__all__ = [
    "GloroNet",
    "architectures",
    "backend",
    "load_model",
    "load_saved_model",
    "callbacks",
    "certificates",
    "graph",
    "layers",
    "lipschitz",
    "losses",
    "metrics",
    "relaxations",
    "schedules",
]
