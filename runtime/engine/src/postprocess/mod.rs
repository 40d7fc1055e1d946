//! From network outputs back to the page: DB boxes, geometry and line crops.

pub mod db;
pub mod geometry;

pub use db::{boxes_from_map, sort_reading_order, DbParams, DetBox};
pub use geometry::crop_quad;
