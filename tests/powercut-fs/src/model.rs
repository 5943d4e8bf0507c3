//! The pure disk model: durable state, volatile state and the ordered log of unsynced
//! operations. No FUSE here, so it is unit-tested directly.
//!
//! Invariant: `volatile` equals `durable` with every op of `log` replayed in order (up to
//! unreachable inodes and timestamps). `sync(ino)` moves the part of the log that concerns
//! `ino` (its data ops, or, for a directory, its entry changes) into `durable`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{CutMode, CutReport};

/// Inode number; 1 is the root directory.
pub type Ino = u64;
/// The root directory's inode number.
pub const ROOT_INO: Ino = 1;
/// A failed operation, as a libc errno value.
pub type Errno = i32;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (its target is the data).
    Symlink,
}

/// Inode metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Kind of inode.
    pub kind: Kind,
    /// Permission bits.
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Change time.
    pub ctime: SystemTime,
}

/// One inode: metadata, content (file data or symlink target) and directory entries.
#[derive(Debug, Clone)]
pub struct Inode {
    /// Metadata.
    pub meta: Meta,
    /// File content or symlink target.
    pub data: Vec<u8>,
    /// Directory entries (directories only).
    pub entries: BTreeMap<OsString, Ino>,
}

#[derive(Debug, Clone, Default)]
struct Tree {
    inodes: HashMap<Ino, Inode>,
}

/// One change of a directory entry: `name` in `dir` now points at `target`, or is removed.
#[derive(Debug, Clone)]
struct Change {
    dir: Ino,
    name: OsString,
    target: Option<Ino>,
}

/// One unsynced operation.
#[derive(Debug, Clone)]
enum Op {
    Write {
        ino: Ino,
        offset: u64,
        data: Vec<u8>,
    },
    SetLen {
        ino: Ino,
        size: u64,
    },
    Extend {
        ino: Ino,
        end: u64,
    },
    SetMeta {
        ino: Ino,
        meta: Meta,
    },
    Names {
        changes: Vec<Change>,
    },
}

impl Op {
    fn data_ino(&self) -> Option<Ino> {
        match self {
            Op::Write { ino, .. }
            | Op::SetLen { ino, .. }
            | Op::Extend { ino, .. }
            | Op::SetMeta { ino, .. } => Some(*ino),
            Op::Names { .. } => None,
        }
    }
}

fn resize(data: &mut Vec<u8>, size: u64) {
    data.resize(usize::try_from(size).unwrap_or(usize::MAX), 0);
}

impl Tree {
    fn apply(&mut self, op: &Op, births: &HashMap<Ino, Inode>) {
        let now = SystemTime::now();
        match op {
            Op::Write { ino, offset, data } => {
                if let Some(inode) = self.inodes.get_mut(ino) {
                    let start = usize::try_from(*offset).unwrap_or(usize::MAX);
                    let end = start.saturating_add(data.len());
                    if inode.data.len() < end {
                        inode.data.resize(end, 0);
                    }
                    inode.data[start..end].copy_from_slice(data);
                    inode.meta.mtime = now;
                    inode.meta.ctime = now;
                }
            }
            Op::SetLen { ino, size } => {
                if let Some(inode) = self.inodes.get_mut(ino) {
                    resize(&mut inode.data, *size);
                    inode.meta.mtime = now;
                    inode.meta.ctime = now;
                }
            }
            Op::Extend { ino, end } => {
                if let Some(inode) = self.inodes.get_mut(ino) {
                    if (inode.data.len() as u64) < *end {
                        resize(&mut inode.data, *end);
                    }
                }
            }
            Op::SetMeta { ino, meta } => {
                if let Some(inode) = self.inodes.get_mut(ino) {
                    inode.meta = meta.clone();
                }
            }
            Op::Names { changes } => {
                for c in changes {
                    self.apply_change(c, births);
                }
            }
        }
    }

    fn apply_change(&mut self, c: &Change, births: &HashMap<Ino, Inode>) {
        if !matches!(self.inodes.get(&c.dir), Some(d) if d.meta.kind == Kind::Dir) {
            return; // the directory itself did not survive
        }
        match c.target {
            Some(t) => {
                if let std::collections::hash_map::Entry::Vacant(v) = self.inodes.entry(t) {
                    let Some(birth) = births.get(&t) else { return };
                    v.insert(birth.clone());
                }
                if let Some(d) = self.inodes.get_mut(&c.dir) {
                    d.entries.insert(c.name.clone(), t);
                }
            }
            None => {
                if let Some(d) = self.inodes.get_mut(&c.dir) {
                    d.entries.remove(&c.name);
                }
            }
        }
    }

    /// Drops every inode not reachable from the root.
    fn collect_garbage(&mut self) {
        let mut seen = HashSet::from([ROOT_INO]);
        let mut stack = vec![ROOT_INO];
        while let Some(ino) = stack.pop() {
            if let Some(inode) = self.inodes.get(&ino) {
                for child in inode.entries.values() {
                    if seen.insert(*child) {
                        stack.push(*child);
                    }
                }
            }
        }
        self.inodes.retain(|ino, _| seen.contains(ino));
    }
}

/// The modelled disk.
#[derive(Debug)]
pub struct Disk {
    durable: Tree,
    volatile: Tree,
    log: Vec<Op>,
    /// How each inode created since the last cut looked when born (empty content).
    births: HashMap<Ino, Inode>,
    next_ino: Ino,
    rng: StdRng,
}

fn new_meta(kind: Kind, perm: u16, uid: u32, gid: u32) -> Meta {
    let now = SystemTime::now();
    Meta {
        kind,
        perm,
        uid,
        gid,
        atime: now,
        mtime: now,
        ctime: now,
    }
}

impl Disk {
    /// An empty disk (root directory only, durable); `seed` drives every random choice.
    pub fn new(seed: u64) -> Disk {
        let root = Inode {
            meta: new_meta(Kind::Dir, 0o755, 0, 0),
            data: Vec::new(),
            entries: BTreeMap::new(),
        };
        let durable = Tree {
            inodes: HashMap::from([(ROOT_INO, root)]),
        };
        Disk {
            volatile: durable.clone(),
            durable,
            log: Vec::new(),
            births: HashMap::new(),
            next_ino: ROOT_INO + 1,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn push(&mut self, op: Op) {
        self.volatile.apply(&op, &self.births);
        self.log.push(op);
    }

    /// Number of unsynced operations.
    pub fn unsynced_ops(&self) -> usize {
        self.log.len()
    }

    /// The volatile inode `ino`.
    pub fn get(&self, ino: Ino) -> Result<&Inode, Errno> {
        self.volatile.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> Result<&Inode, Errno> {
        let d = self.get(ino)?;
        if d.meta.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(d)
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// Link count: names pointing at a file, or 2 + subdirectories for a directory.
    pub fn nlink(&self, ino: Ino) -> u32 {
        let Ok(inode) = self.get(ino) else { return 0 };
        if inode.meta.kind == Kind::Dir {
            let subdirs = inode
                .entries
                .values()
                .filter(|c| matches!(self.get(**c), Ok(i) if i.meta.kind == Kind::Dir))
                .count();
            2 + subdirs as u32
        } else {
            let n = self
                .volatile
                .inodes
                .values()
                .flat_map(|i| i.entries.values())
                .filter(|c| **c == ino)
                .count();
            n as u32
        }
    }

    /// Parent directory of directory `ino` (the root is its own parent).
    pub fn parent_of(&self, ino: Ino) -> Ino {
        self.volatile
            .inodes
            .iter()
            .find(|(_, i)| i.entries.values().any(|c| *c == ino))
            .map_or(ROOT_INO, |(p, _)| *p)
    }

    /// Creates `name` in `parent` (file, directory or symlink with target `data`).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    ) -> Result<Ino, Errno> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.births.insert(
            ino,
            Inode {
                meta: new_meta(kind, perm, uid, gid),
                data,
                entries: BTreeMap::new(),
            },
        );
        self.push(Op::Names {
            changes: vec![Change {
                dir: parent,
                name: name.to_owned(),
                target: Some(ino),
            }],
        });
        Ok(ino)
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<Ino, Errno> {
        let ino = self.lookup(parent, name)?;
        if self.get(ino)?.meta.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.remove_name(parent, name);
        Ok(ino)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let d = self.dir(ino)?;
        if !d.entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.remove_name(parent, name);
        Ok(())
    }

    fn remove_name(&mut self, parent: Ino, name: &OsStr) {
        self.push(Op::Names {
            changes: vec![Change {
                dir: parent,
                name: name.to_owned(),
                target: None,
            }],
        });
    }

    fn is_ancestor(&self, anc: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == anc {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            ino = self.parent_of(ino);
        }
    }

    /// Renames `parent/name` to `newparent/newname`, replacing a compatible target.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let src_dir = self.get(ino)?.meta.kind == Kind::Dir;
        self.dir(newparent)?;
        if let Ok(old) = self.lookup(newparent, newname) {
            if noreplace {
                return Err(libc::EEXIST);
            }
            if old == ino {
                return Ok(());
            }
            let old_inode = self.get(old)?;
            match (src_dir, old_inode.meta.kind == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !old_inode.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        if src_dir && self.is_ancestor(ino, newparent) {
            return Err(libc::EINVAL);
        }
        self.push(Op::Names {
            changes: vec![
                Change {
                    dir: parent,
                    name: name.to_owned(),
                    target: None,
                },
                Change {
                    dir: newparent,
                    name: newname.to_owned(),
                    target: Some(ino),
                },
            ],
        });
        Ok(())
    }

    fn file(&self, ino: Ino) -> Result<&Inode, Errno> {
        let i = self.get(ino)?;
        match i.meta.kind {
            Kind::File => Ok(i),
            Kind::Dir => Err(libc::EISDIR),
            Kind::Symlink => Err(libc::EINVAL),
        }
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<&[u8], Errno> {
        let data = &self.file(ino)?.data;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Ok(&data[start..end])
    }

    /// Writes `data` at `offset` (volatile until `sync(ino)`).
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.file(ino)?;
        self.push(Op::Write {
            ino,
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Sets the file size (truncate or zero-extend).
    pub fn set_len(&mut self, ino: Ino, size: u64) -> Result<(), Errno> {
        self.file(ino)?;
        self.push(Op::SetLen { ino, size });
        Ok(())
    }

    /// Zero-extends the file to at least `end` bytes (fallocate mode 0).
    pub fn extend(&mut self, ino: Ino, end: u64) -> Result<(), Errno> {
        self.file(ino)?;
        self.push(Op::Extend { ino, end });
        Ok(())
    }

    /// Replaces the metadata of `ino` (kind is kept).
    pub fn set_meta(&mut self, ino: Ino, mut meta: Meta) -> Result<(), Errno> {
        meta.kind = self.get(ino)?.meta.kind;
        self.push(Op::SetMeta { ino, meta });
        Ok(())
    }

    /// fsync/fdatasync/fsyncdir of `ino`: its data ops (a file) or its entry changes (a
    /// directory) and its metadata become durable, in log order.
    pub fn sync(&mut self, ino: Ino) -> Result<(), Errno> {
        self.get(ino)?;
        if !self.durable.inodes.contains_key(&ino) {
            if let Some(birth) = self.births.get(&ino) {
                self.durable.inodes.insert(ino, birth.clone());
            }
        }
        let log = std::mem::take(&mut self.log);
        for mut op in log {
            if op.data_ino() == Some(ino) {
                self.durable.apply(&op, &self.births);
                continue;
            }
            if let Op::Names { changes } = &mut op {
                let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(changes)
                    .into_iter()
                    .partition(|c| c.dir == ino);
                for c in &mine {
                    self.durable.apply_change(c, &self.births);
                }
                if rest.is_empty() {
                    continue;
                }
                *changes = rest;
            }
            self.log.push(op);
        }
        Ok(())
    }

    /// Power cut and reboot: durable state plus the ops `mode` keeps becomes the new state.
    pub fn cut(&mut self, mode: CutMode) -> CutReport {
        let log = std::mem::take(&mut self.log);
        let unsynced_ops = log.len();
        let mut state = self.durable.clone();
        let mut kept_ops = 0;
        let mut torn_bytes_kept = None;
        match mode {
            CutMode::DropUnsynced | CutMode::CrashAtNextFsync => {}
            CutMode::TearLastWrite => {
                let last = log.iter().rposition(|op| matches!(op, Op::Write { .. }));
                for (i, op) in log.iter().enumerate() {
                    if Some(i) == last {
                        if let Op::Write { ino, offset, data } = op {
                            let keep = if data.is_empty() {
                                0
                            } else {
                                self.rng.random_range(0..data.len())
                            };
                            torn_bytes_kept = Some((keep, data.len()));
                            let torn = Op::Write {
                                ino: *ino,
                                offset: *offset,
                                data: data[..keep].to_vec(),
                            };
                            state.apply(&torn, &self.births);
                        }
                    } else {
                        state.apply(op, &self.births);
                        kept_ops += 1;
                    }
                }
            }
            CutMode::KeepRandomSubset => {
                for op in &log {
                    if self.rng.random_bool(0.5) {
                        state.apply(op, &self.births);
                        kept_ops += 1;
                    }
                }
            }
        }
        state.collect_garbage();
        self.births.clear();
        self.volatile = state.clone();
        self.durable = state;
        CutReport {
            mode,
            unsynced_ops,
            kept_ops,
            torn_bytes_kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(d: &mut Disk, parent: Ino, name: &str) -> Ino {
        d.create(
            parent,
            OsStr::new(name),
            Kind::File,
            0o644,
            0,
            0,
            Vec::new(),
        )
        .unwrap()
    }

    fn content(d: &Disk, parent: Ino, name: &str) -> Option<Vec<u8>> {
        let ino = d.lookup(parent, OsStr::new(name)).ok()?;
        Some(d.get(ino).unwrap().data.clone())
    }

    #[test]
    fn unsynced_write_and_create_are_dropped() {
        let mut d = Disk::new(1);
        let f = file(&mut d, ROOT_INO, "a");
        d.write(f, 0, b"hello").unwrap();
        let r = d.cut(CutMode::DropUnsynced);
        assert_eq!((r.unsynced_ops, r.kept_ops), (2, 0));
        assert_eq!(content(&d, ROOT_INO, "a"), None);
    }

    #[test]
    fn file_and_dir_sync_survive_every_mode() {
        for mode in CutMode::ALL {
            let mut d = Disk::new(7);
            let f = file(&mut d, ROOT_INO, "a");
            d.write(f, 0, b"hello").unwrap();
            d.sync(f).unwrap();
            d.sync(ROOT_INO).unwrap();
            assert_eq!(d.unsynced_ops(), 0);
            d.cut(mode);
            assert_eq!(content(&d, ROOT_INO, "a").as_deref(), Some(&b"hello"[..]));
        }
    }

    #[test]
    fn file_sync_without_dir_sync_loses_the_name() {
        let mut d = Disk::new(1);
        let f = file(&mut d, ROOT_INO, "a");
        d.write(f, 0, b"x").unwrap();
        d.sync(f).unwrap();
        d.cut(CutMode::DropUnsynced);
        assert_eq!(content(&d, ROOT_INO, "a"), None);
    }

    #[test]
    fn dir_sync_alone_keeps_an_empty_file() {
        let mut d = Disk::new(1);
        let f = file(&mut d, ROOT_INO, "a");
        d.write(f, 0, b"x").unwrap();
        d.sync(ROOT_INO).unwrap();
        d.cut(CutMode::DropUnsynced);
        assert_eq!(content(&d, ROOT_INO, "a"), Some(Vec::new()));
    }

    #[test]
    fn atomic_replace_is_old_or_new_under_random_subsets() {
        for seed in 0..64 {
            let mut d = Disk::new(seed);
            let t = file(&mut d, ROOT_INO, "target");
            d.write(t, 0, b"old").unwrap();
            d.sync(t).unwrap();
            d.sync(ROOT_INO).unwrap();
            let tmp = file(&mut d, ROOT_INO, "tmp");
            d.write(tmp, 0, b"new!").unwrap();
            d.sync(tmp).unwrap();
            d.rename(
                ROOT_INO,
                OsStr::new("tmp"),
                ROOT_INO,
                OsStr::new("target"),
                false,
            )
            .unwrap();
            d.cut(CutMode::KeepRandomSubset);
            let got = content(&d, ROOT_INO, "target").unwrap();
            assert!(got == b"old" || got == b"new!", "seed {seed}: {got:?}");
        }
    }

    #[test]
    fn tear_keeps_earlier_writes_and_a_strict_prefix_of_the_last() {
        let run = |seed| {
            let mut d = Disk::new(seed);
            let f = file(&mut d, ROOT_INO, "a");
            d.sync(f).unwrap();
            d.sync(ROOT_INO).unwrap();
            d.write(f, 0, b"first").unwrap();
            d.write(f, 5, &[9u8; 100]).unwrap();
            let r = d.cut(CutMode::TearLastWrite);
            (r, content(&d, ROOT_INO, "a").unwrap())
        };
        let (r, got) = run(3);
        let (kept, len) = r.torn_bytes_kept.unwrap();
        assert_eq!(len, 100);
        assert!(kept < len);
        assert_eq!(&got[..5], b"first");
        assert_eq!(got.len(), 5 + kept);
        assert_eq!(run(3).1, got, "deterministic for a seed");
    }

    #[test]
    fn random_subset_keeps_some_but_not_all() {
        let mut d = Disk::new(42);
        let f = file(&mut d, ROOT_INO, "a");
        d.sync(f).unwrap();
        d.sync(ROOT_INO).unwrap();
        for i in 0..64u64 {
            d.write(f, i, &[1]).unwrap();
        }
        let r = d.cut(CutMode::KeepRandomSubset);
        assert!(r.kept_ops > 0 && r.kept_ops < 64, "{r:?}");
        let got = content(&d, ROOT_INO, "a").unwrap();
        assert!(got.contains(&1));
    }

    #[test]
    fn unsynced_unlink_and_rename_are_undone() {
        let mut d = Disk::new(1);
        let a = file(&mut d, ROOT_INO, "a");
        d.write(a, 0, b"A").unwrap();
        let b = file(&mut d, ROOT_INO, "b");
        d.write(b, 0, b"B").unwrap();
        d.sync(a).unwrap();
        d.sync(b).unwrap();
        d.sync(ROOT_INO).unwrap();
        d.unlink(ROOT_INO, OsStr::new("a")).unwrap();
        d.rename(ROOT_INO, OsStr::new("b"), ROOT_INO, OsStr::new("c"), false)
            .unwrap();
        d.cut(CutMode::DropUnsynced);
        assert_eq!(content(&d, ROOT_INO, "a").as_deref(), Some(&b"A"[..]));
        assert_eq!(content(&d, ROOT_INO, "b").as_deref(), Some(&b"B"[..]));
        assert_eq!(content(&d, ROOT_INO, "c"), None);
    }
}
