//! The fuser `Filesystem` over the shared [`Disk`](crate::model::Disk): every request is
//! answered from the volatile state; fsync/fsyncdir call `Disk::sync` unless the crash
//! trap is armed, in which case the reply is withheld until the next cut.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::model::{Disk, Ino, Kind};
use crate::FsStats;

const TTL: Duration = Duration::ZERO;

/// State shared by the FUSE thread and the test's handle.
pub(crate) struct State {
    pub disk: Disk,
    /// Open file and directory handles (fh -> inode); cleared by a cut.
    pub handles: HashMap<u64, Ino>,
    pub dir_snapshots: HashMap<u64, Vec<(Ino, FileType, std::ffi::OsString)>>,
    pub next_fh: u64,
    pub trap_armed: bool,
    pub trap_hit: bool,
    pub withheld: Vec<ReplyEmpty>,
    pub stats: FsStats,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub trap_cv: Condvar,
}

impl Shared {
    pub fn new(seed: u64) -> Shared {
        Shared {
            state: Mutex::new(State {
                disk: Disk::new(seed),
                handles: HashMap::new(),
                dir_snapshots: HashMap::new(),
                next_fh: 1,
                trap_armed: false,
                trap_hit: false,
                withheld: Vec::new(),
                stats: FsStats::default(),
            }),
            trap_cv: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct PowerCutFuse {
    pub shared: Arc<Shared>,
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(disk: &Disk, ino: Ino) -> Result<FileAttr, i32> {
    let i = disk.get(ino)?;
    let size = i.data.len() as u64;
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.meta.atime,
        mtime: i.meta.mtime,
        ctime: i.meta.ctime,
        crtime: i.meta.ctime,
        kind: kind(i.meta.kind),
        perm: i.meta.perm,
        nlink: disk.nlink(ino),
        uid: i.meta.uid,
        gid: i.meta.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl PowerCutFuse {
    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut State) -> Result<Ino, i32>) {
        let mut st = self.shared.lock();
        match f(&mut st).and_then(|ino| attr(&st.disk, ino)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut State) -> Result<(), i32>) {
        let r = f(&mut self.shared.lock());
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open_handle(st: &mut State, ino: Ino) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, ino);
        fh
    }

    fn fsync_common(&self, ino: Ino, fh: Option<u64>, dir: bool, reply: ReplyEmpty) {
        let mut st = self.shared.lock();
        let is_dir = dir || matches!(st.disk.get(ino), Ok(i) if i.meta.kind == Kind::Dir);
        if is_dir {
            st.stats.fsyncdirs += 1;
        } else {
            st.stats.fsyncs += 1;
        }
        if st.trap_armed {
            st.trap_hit = true;
            st.withheld.push(reply);
            self.shared.trap_cv.notify_all();
            return;
        }
        if let Some(fh) = fh {
            if !dir && !st.handles.contains_key(&fh) {
                drop(st);
                reply.error(Errno::EIO);
                return;
            }
        }
        let r = st.disk.sync(ino);
        drop(st);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn perm(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl Filesystem for PowerCutFuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |st| st.disk.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.shared.lock();
        match attr(&st.disk, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.shared.lock();
        let r = (|| {
            if let Some(fh) = fh {
                if !st.handles.contains_key(&fh.0) {
                    return Err(libc::EIO);
                }
            }
            if let Some(size) = size {
                st.disk.set_len(ino.0, size)?;
            }
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                let mut meta = st.disk.get(ino.0)?.meta.clone();
                if let Some(m) = mode {
                    meta.perm = (m & 0o7777) as u16;
                }
                meta.uid = uid.unwrap_or(meta.uid);
                meta.gid = gid.unwrap_or(meta.gid);
                if let Some(t) = atime {
                    meta.atime = time(t);
                }
                if let Some(t) = mtime {
                    meta.mtime = time(t);
                }
                meta.ctime = SystemTime::now();
                st.disk.set_meta(ino.0, meta)?;
            }
            attr(&st.disk, ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.shared.lock();
        match st.disk.get(ino.0) {
            Ok(i) if i.meta.kind == Kind::Symlink => reply.data(&i.data),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        self.entry(reply, |st| {
            st.disk.create(
                parent.0,
                name,
                Kind::File,
                perm(mode, umask),
                req.uid(),
                req.gid(),
                Vec::new(),
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |st| {
            st.disk.create(
                parent.0,
                name,
                Kind::Dir,
                perm(mode, umask),
                req.uid(),
                req.gid(),
                Vec::new(),
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| st.disk.unlink(parent.0, name).map(|_| ()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |st| st.disk.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        use std::os::unix::ffi::OsStrExt;
        self.entry(reply, |st| {
            st.disk.create(
                parent.0,
                link_name,
                Kind::Symlink,
                0o777,
                req.uid(),
                req.gid(),
                target.as_os_str().as_bytes().to_vec(),
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.empty(reply, |st| {
            st.disk
                .rename(parent.0, name, newparent.0, newname, noreplace)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.shared.lock();
        match st.disk.get(ino.0) {
            Ok(i) if i.meta.kind == Kind::Dir => reply.error(Errno::EISDIR),
            Ok(_) => {
                let fh = Self::open_handle(&mut st, ino.0);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.shared.lock();
        if !st.handles.contains_key(&fh.0) {
            reply.error(Errno::EIO);
            return;
        }
        match st.disk.read(ino.0, offset, size) {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.shared.lock();
        if !st.handles.contains_key(&fh.0) {
            reply.error(Errno::EIO);
            return;
        }
        match st.disk.write(ino.0, offset, data) {
            Ok(()) => {
                st.stats.writes += 1;
                st.stats.bytes_written += data.len() as u64;
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_common(ino.0, Some(fh.0), false, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.shared.lock();
        let snapshot = match st.disk.get(ino.0) {
            Ok(d) if d.meta.kind == Kind::Dir => {
                let mut v = vec![
                    (ino.0, FileType::Directory, ".".into()),
                    (st.disk.parent_of(ino.0), FileType::Directory, "..".into()),
                ];
                for (name, child) in &d.entries {
                    if let Ok(c) = st.disk.get(*child) {
                        v.push((*child, kind(c.meta.kind), name.clone()));
                    }
                }
                v
            }
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(err(e)),
        };
        let fh = Self::open_handle(&mut st, ino.0);
        st.dir_snapshots.insert(fh, snapshot);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.shared.lock();
        let Some(snap) = st.dir_snapshots.get(&fh.0) else {
            reply.error(Errno::EIO);
            return;
        };
        for (i, (ino, k, name)) in snap.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.shared.lock();
        st.handles.remove(&fh.0);
        st.dir_snapshots.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_common(ino.0, None, true, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 28, 1 << 28, 1 << 28, 1 << 24, 1 << 24, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.empty(reply, |st| st.disk.get(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.shared.lock();
        let r = st
            .disk
            .create(
                parent.0,
                name,
                Kind::File,
                perm(mode, umask),
                req.uid(),
                req.gid(),
                Vec::new(),
            )
            .and_then(|ino| attr(&st.disk, ino));
        match r {
            Ok(a) => {
                let fh = Self::open_handle(&mut st, a.ino.0);
                reply.created(
                    &TTL,
                    &a,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        self.empty(reply, |st| {
            if !st.handles.contains_key(&fh.0) {
                return Err(libc::EIO);
            }
            st.disk.extend(ino.0, offset.saturating_add(length))
        });
    }
}
