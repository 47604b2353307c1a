"""Exceptions raised by fsagen.  Every one names what was wrong and where."""


class FsagenError(Exception):
    """Base of fsagen's own errors; the CLI prints these as one line and exits 2."""


class UnsupportedSpec(FsagenError, ValueError):
    """A KernelSpec (or model spec) that a schedule or kernel cannot handle."""


class SpecError(FsagenError, ValueError):
    """A malformed spec: a field with a wrong type or value."""


class GridError(FsagenError, ValueError):
    """A malformed grid file."""


class ScheduleError(FsagenError, ValueError):
    """A malformed schedule file, or an unknown arch."""


class NoGPU(FsagenError, RuntimeError):
    """An arch had to be detected but no CUDA device is visible."""


class ArtifactError(FsagenError, RuntimeError):
    """A compiled artifact is missing, incomplete or cannot be loaded."""
