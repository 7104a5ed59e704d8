"""BraTS conventions, the record schema, the Grain pipeline and 3D transforms."""
