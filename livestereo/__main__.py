import sys
from livestereo.cli import main

sys.exit(main())
