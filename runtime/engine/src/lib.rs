//! PP-OCR text detection and recognition implemented natively in Candle.
