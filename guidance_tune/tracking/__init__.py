"""MLflow: the run record, opened, resumed and closed once (:mod:`.record`), the store checks
(:mod:`.store`), the params and dataset inputs a run logs (:mod:`.params`, :mod:`.inputs`), a
run trained and recorded in its own process (:mod:`.recorded`), results read back
(:mod:`.results`), the study's page in the UI (:mod:`.view`), and the winner as a registered
model (:mod:`.winner`)."""
