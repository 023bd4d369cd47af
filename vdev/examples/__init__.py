"""Small, complete devices written against the public :class:`vdev.Device` API, as
worked examples for backend authors (``docs/writing-a-device.md`` builds
:mod:`vdev.examples.rng` step by step).

* :mod:`vdev.examples.rng` — virtio-rng (entropy source, device id 4):
  ``python -m vdev rng [--seed N] --control EP``.
"""

from __future__ import annotations

__all__: list[str] = []
