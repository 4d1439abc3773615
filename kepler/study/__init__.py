"""``kepler study``: do the Kepler regularizers and the codebook partition help? Measured, not claimed.

A study trains a set of quantizer variants on the same data, step budget and seeds, evaluates each
on held-out images and writes, to its output folder:

* ``study.json``: everything (per run and aggregated over seeds, the weight sweep, the machine);
* ``study.md``: the design, the sweep, the results table (mean and spread over seeds) and each
  variant's difference to its reference with a seed-noise verdict;
* ``curves.png`` (validation PSNR and utilization against steps), ``usage.png`` (code usage per
  variant) and ``codewords_<variant>.png`` (the codewords of 3-D sub-codebooks).

The study config (built-in ``study_sample``: ``kepler/configs/study_sample.yaml``) names a trainer
config every run starts from, ``common`` trainer overrides, the ``variants`` (trainer overrides
each, and the reference each is compared to) and the ``sweep``: a variant whose regularizer weight
is ``sweep`` takes the weight the sweep chose, never one written by hand. The sweep trains the
sweep's base variant once per candidate weight (and once with weight 0) for a shorter budget, and
picks, per regularizer, the weight with the best held-out PSNR among those that visibly change
training (see :func:`kepler.study.stats.select_weight`), judged against a reference run of the same
variant at weight 0 or at the sweep's ``reference`` weight for that key.

An optional ``prior`` block (built-in ``study_prior``) also trains a code prior on each run's
tokenizer once it is evaluated: ``config`` names a prior config (a file relative to the study config,
or a built-in name such as ``prior_sample``) and ``set`` its overrides for every run (a step budget
without a time limit, so every variant gets the same); the ``quick`` block's ``prior`` mapping is
merged over ``set``; both are checked when the study config loads. The prior trains in ``<run>/prior`` with the run's seed, on the run's
``checkpoints/last.pt``, and its ``data.train``/``val``/``size``/``resize``/``val_max_images`` are the
tokenizer run's (:data:`kepler.study.config.PRIOR_DATA_FROM_TOKENIZER`; ``set`` may not name them), so
its held-out maps are the images PSNR is measured on. Each run's metrics gain
``prior_bits_per_token``, ``prior_bits_per_image`` (bits per token x tokens per map ``H*W*P``: what
a generator pays for a whole image, comparable across code layouts, unlike bits per token) and
``unigram_bits_per_image`` (the unigram baseline, the same way); the results table gains ``bits/img``
and ``unigram bits/img``, the differences table ``Δ bits/img``. The sweep's runs train no prior.

``--sweep-only`` runs just the sweep (``sweep.json``, ``sweep.md``); ``--readme docs/results.md`` also
writes the results between that file's ``kepler-study`` markers of the study
(``kepler.study.report.readme_markers``).
``--variants a,b`` runs only those variants and their references (and the sweep only if one of them
takes a swept weight), into the study's own run folders, so the full study later reuses them; its
report goes to ``<out>/variants_a_b/`` and it cannot write the README (which reports whole studies).

Runs are independent processes (``jobs`` at a time, each with ``threads`` threads, by default
``cores // jobs``); a run
whose ``result.json`` matches its configuration is reused, so an interrupted study continues where
it stopped; of a reused run whose prior settings changed (or whose prior was interrupted), only the
prior trains again. ``--quick`` swaps in the config's ``quick`` block (a tiny model, a few steps) so every
variant and the sweep run end to end in a minute; the tests use it.

One job per module, in the order a study uses them:

* :mod:`kepler.study.config`: loading and checking the study config, trainer override strings, a
  run's code layout and bits per position;
* :mod:`kepler.study.runner`: one run (train, evaluate, summarize), the job lists, the sweep, the
  process pool, :func:`~kepler.study.runner.run_study`;
* :mod:`kepler.study.stats`: summaries over seeds, seed-noise checks, the sweep's weight choice;
* :mod:`kepler.study.report`: ``study.md``, ``sweep.md``, the README block, the files written;
* :mod:`kepler.study.plots`: the PNG figures.

``kepler study`` (in :mod:`kepler.cli`) parses the arguments, calls these and prints; nothing here
prints. The package re-exports nothing: each name has one home, and the only caller outside the
package is the command line.
"""
