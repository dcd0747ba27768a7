"""livestereo: live tilt-less stereo 3D imaging beside a scanning transmission electron microscope."""

__version__ = "0.1.0"
