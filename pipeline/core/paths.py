"""Where the stages read and write by default: the layout dvc.yaml uses, in one place for every command
and library function (dvc.yaml names the same paths; a test keeps the two in step)."""

CACHE_DIR = "cache"
XE_DIR = "checkpoints/xe"  # train's checkpoints (cross-entropy)
XE_METRICS = "metrics/train"
SCST_DIR = "checkpoints/scst"  # scst's checkpoints
SCST_METRICS = "metrics/scst"
XE_CHECKPOINT = f"{XE_DIR}/best.pt"  # what scst starts from
FINAL_CHECKPOINT = f"{SCST_DIR}/best.pt"  # what evaluate scores and caption uses
EVAL_METRICS = "metrics/eval.json"
