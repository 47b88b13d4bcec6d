"""Getting data onto the disk: `pipeline download coco2014` and the generated offline demo data."""
