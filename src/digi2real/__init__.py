"""digi2real: realistic synthetic face-recognition data from rendered identities (the Digi2Real method).

The pipeline stages live in sub-packages: ``sources`` (where identities come from), ``faces`` (face geometry and
face models), ``identity`` (the paper's embedding math: prototypes, selection, SLERP plan).
"""

__version__ = "0.1.0"
