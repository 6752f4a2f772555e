"""Studies on Ray Tune and Optuna: the study file (:mod:`.config`), the checks before launch
(:mod:`.checks`), the Ray address (:mod:`.address`), :func:`~.launch.launch`, the one tuner
builder (:mod:`.tuner`), what a trial is without Ray (:mod:`.context`), the trainable adapter
(:mod:`.trainable`), the driver's callbacks (:mod:`.callbacks`), the parent run (:mod:`.parent`),
the seed stages, arms and prepare steps (:mod:`.stages`, :mod:`.arms`, :mod:`.prepare`), the
reports (:mod:`.report`, :mod:`.seeds`) and the libraries kept quiet (:mod:`.quiet`)."""
