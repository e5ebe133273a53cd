"""Reports from study results: aggregation (:mod:`.aggregate`), what a report reads (:mod:`.source`),
the paper comparison (:mod:`.paper`), figures (:mod:`.figures`), the renderer (:mod:`.report`) and the
``cawbench report`` command (:mod:`.cli`)."""
