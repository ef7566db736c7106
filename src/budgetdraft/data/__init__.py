"""Long public-domain texts -> TFDS array_record -> fixed-length token windows."""
