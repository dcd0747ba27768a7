"""livestereo: live tilt-less stereo 3D imaging beside a scanning transmission electron microscope."""

import os as _os

# The daemon shares few cores between ingest, libzmq's IO thread and inference. OpenMP
# workers (numba's parallel kernels, torch) that spin-wait after each parallel region steal
# those cores from the socket: measured 0.84x -> 0.90x of a bare PULL loop on 2 cores.
# Must be set before numba or torch start their OpenMP runtime; a user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
