"""setup.cfg holds the metadata; this file names the packages. Only the library and the root files are installed
(train/, eval/ and llava_rad/ are programs run from the checkout), and the project's `space/` travels in the wheel as
the package data `chexficient.hub.space`, so that `push_to_hub --space-id` works from an installed wheel."""

from setuptools import find_packages, setup


setup(
    packages=[*find_packages(include=["chexficient", "chexficient.*"]), "chexficient.hub.space"],
    package_dir={"chexficient.hub.space": "space"},
)
