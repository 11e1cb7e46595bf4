"""Media helpers every part shares: the timebase, PCM audio, images, MP4 files, format sniffing."""
