//! Key files that several processes may race to create: gateway replicas starting together on a
//! shared volume, a worker and its supervisor. A reader must never see one half written, and of
//! two racers exactly one must win, so both go on with the same key.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` unless it exists, readable by its owner only, and returns whether
/// this call made it. The contents go to a temporary file beside it first, synced, and appear at
/// `path` by a hard link, which fails rather than replace a file that another process linked
/// first: the file is whole from the moment it exists.
pub fn create_once(path: &Path, contents: &[u8]) -> std::io::Result<bool> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir
        }
        None => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staged = dir.join(format!(".{name}.{}", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&staged).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&staged, path));
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_many_racers_one_wins_and_every_reader_sees_its_whole_file() {
        let dir = std::env::temp_dir().join(format!("xpand-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("nested").join("gateway.key");
        let racers: Vec<_> = (0..16u8)
            .map(|n| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mine = vec![b'a' + n; 4096];
                    let won = create_once(&path, &mine).unwrap();
                    (won, mine, std::fs::read(&path).unwrap())
                })
            })
            .collect();
        let outcomes: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let on_disk = std::fs::read(&path).unwrap();
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        let winners: Vec<_> = outcomes.iter().filter(|(won, ..)| *won).collect();
        assert_eq!(winners.len(), 1, "exactly one racer made the file");
        assert_eq!(winners[0].1, on_disk, "the file is the winner's");
        assert!(outcomes.iter().all(|(_, _, read)| *read == on_disk));
        assert_eq!(leftovers, 1, "no staged file is left behind");
    }
}
