//! Files: the served folder and confined opens under it (`root`), the table of open files with
//! their validators and session keys (`table`), which file a path named (`identity`), and
//! `Repr-Digest` values computed in the background (`digest`).

pub mod digest;
pub mod identity;
pub mod root;
pub mod table;

pub use self::digest::{DigestState, Digests};
pub use self::root::{strong_etag, OpenError, OpenFile, Root, Source, SMALL_FILE};
pub use self::table::FileTable;
