"""Files and configs, below the models: what every saved model and every config file is made of,
read and checked without building a model.

* :mod:`kepler.io.config`: the config schema (typed sections, ranges, choices), YAML and ``key=value``
  overrides merged and checked, the built-in configs;
* :mod:`kepler.io.checkpoint`: training checkpoints (``.pt``) and the RNG states they carry;
* :mod:`kepler.io.pretrained`: the exported-folder format (safetensors + ``config.yaml`` + card);
* :mod:`kepler.io.weights`: reading any weights file without running its code, and checking a state
  dict against a model before memory is spent on it;
* :mod:`kepler.io.files`: atomic writes, clean-up after a kill, content hashes;
* :mod:`kepler.io.images`: PNGs and image grids.

Building a model from any of these is :func:`kepler.load` (:mod:`kepler.models.load`).
"""
