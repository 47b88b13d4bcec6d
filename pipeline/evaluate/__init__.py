"""Stage "evaluate": a checkpoint scored on a split of the cache -> metrics JSON, COCO results JSON."""
