"""The data every program reads: manifests and report text (`manifests`), image-report pairs (`pairs`), images and
their one error policy (`images`), evaluation label lists (`labels`) and curated-subset records (`subsets`)."""
