"""The one training function (:mod:`.loop`: set-up, epochs, evaluation, the best epoch), its
checkpoints (:mod:`.checkpoint`), the checks a config must pass before a run starts
(:mod:`.checks`), and the reporters that know neither MLflow nor Ray (:mod:`.reporters`)."""
