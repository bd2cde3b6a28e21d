"""`medfdd prepare`: materialise a consortium of hospital folders from a labelled source, for demos, tests and
benchmarks: `sources` (bundled digits, Debian's Fashion-MNIST, MedMNIST files), `partition` (non-IID Dirichlet
split of the classes over sites), `writers` (real DICOM and NIfTI files) and `consortium` (the folders, labels.csv,
the test split and the site and coordinator configs)."""
