"""dicomflow: DICOM archives to NIfTI with dcm2niix."""
